//! Placeholder: the owner side is written next.
#![forbid(unsafe_code)]
