//! The SMTP protocol pieces the session is made of.

pub mod command;
pub mod data;
pub mod reply;
pub mod session;
