//! The SMTP protocol pieces the session is made of: command framing and parsing, the DATA/BDAT
//! receiver, the SASL exchanges of AUTH, the `Received:` header, and the session.

pub mod address;
pub mod command;
pub mod data;
#[doc(hidden)]
pub mod fuzzing;
pub mod received;
pub mod sasl;
pub mod session;
