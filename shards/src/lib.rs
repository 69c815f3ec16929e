pub mod error;
pub mod loader;
