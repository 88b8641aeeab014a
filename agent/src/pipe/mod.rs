//! The pipes between a source or sink and the coordinator: chunking a byte stream into
//! batches for upload ([`Batcher`]), reading a snapshot's manifest back ([`read`]), and
//! reassembling its chunks in manifest order, each verified ([`Reassembler`]).
//!
//! Sources and sinks (and the database engines) use these; this module imports nothing of the
//! agent.

mod batcher;
pub(crate) mod read;
mod reassemble;

pub(crate) use batcher::Batcher;
pub(crate) use reassemble::{fetch, Reassembler};
