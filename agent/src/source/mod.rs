//! Sources: where backup bytes come from. Each yields one byte stream (`command`) or a file
//! tree whose files are streamed one by one (`files`).

pub(crate) mod command;
pub(crate) mod files;
