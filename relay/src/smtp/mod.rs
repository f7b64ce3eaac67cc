//! The SMTP protocol pieces the session is made of.

pub mod command;
pub mod data;
#[doc(hidden)]
pub mod fuzzing;
pub mod reply;
pub mod session;
