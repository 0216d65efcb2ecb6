//! The daemons' wiring: the IO drivers around the [`crate::core`] state
//! machines, and the [`volume`] API through which writes enter the primary.

pub mod block_device;
pub mod error;
pub mod local_cluster;
pub mod primary;
mod replies;
pub mod runtime;
pub mod secondary;
mod tool_server;
pub mod volume;

pub use error::NodeError;

use crate::config::{Config, NodeConfig};
use crate::store::DataFile;

/// Node `node_id`'s config and its data copy, checked against the volume:
/// a copy of another volume, node or geometry is refused.
fn open_node_data(config: &Config, node_id: u32) -> Result<(NodeConfig, DataFile), NodeError> {
    let node = config
        .node(node_id)
        .ok_or(NodeError::UnknownNode { node_id })?
        .clone();
    let data = DataFile::open(
        &node.data_path,
        *config.volume.uuid.as_bytes(),
        node_id,
        config.volume.block_size_bytes,
        config.volume.size_bytes,
    )?;
    Ok((node, data))
}
