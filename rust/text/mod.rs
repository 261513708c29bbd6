//! Output text of a generation, handled as bytes: turning each token's raw bytes into whole
//! characters ([`Utf8Stream`]) and finding stop strings across token boundaries
//! ([`StopMatcher`]).
//!
//! Both work on the bytes the model produces, never on per-token strings, because a token
//! may end in the middle of a character and a stop string may begin in the middle of a
//! token. Depends on nothing but [`crate::error`].

mod stop_strings;
mod utf8_stream;

#[cfg(test)]
#[allow(clippy::unwrap_used)] // in tests a panic is the failure report
mod tests;

pub use stop_strings::{StopMatcher, MAX_STOP_STRING_BYTES};
pub use utf8_stream::Utf8Stream;
