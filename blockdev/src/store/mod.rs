//! Stores that keep a volume's bytes: a sparse file driven by an I/O engine, or memory.

pub mod mem;

pub use mem::MemBackend;
