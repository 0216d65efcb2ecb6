//! Bad input gets a clear error and changes nothing: a misspelt config
//! field, another volume's file, a corrupted frame and a stale primary are
//! each refused, saying what and where, and no log or copy moves.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use replblk::config::ReplicationConfig;
use replblk::node::local_cluster::LocalCluster;
use replblk::proto::{
    decode_frame, encode_update_header, ErrorCode, Frame, Hello, Role, UpdateHeader,
    PROTOCOL_VERSION,
};

const REPLBLKD: &str = env!("CARGO_BIN_EXE_replblkd");
const VOLUME_BYTES: u64 = 16 << 20;
const LOG_BYTES: u64 = 8 << 20;

fn cluster(dir: &Path) -> LocalCluster {
    LocalCluster::create(
        dir,
        Path::new(REPLBLKD),
        1,
        VOLUME_BYTES,
        LOG_BYTES,
        &ReplicationConfig::default(),
    )
    .expect("cluster created")
}

fn replblkd_secondary(config: &Path, node: u32) -> std::process::Output {
    Command::new(REPLBLKD)
        .args(["secondary", "--config"])
        .arg(config)
        .args(["--node", &node.to_string()])
        .output()
        .expect("replblkd runs")
}

#[test]
fn a_misspelt_config_field_is_refused_naming_the_file_and_field() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cluster = cluster(dir.path());
    let text = std::fs::read_to_string(cluster.config_path()).unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        text.replace("clear_interval_ms", "clear_intervall_ms"),
    )
    .unwrap();
    let output = replblkd_secondary(&broken, 2);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "replblkd must refuse the config");
    assert!(
        stderr.contains("broken.toml") && stderr.contains("clear_intervall_ms"),
        "{stderr}"
    );
}

#[test]
fn another_volumes_data_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let ours = cluster(&dir.path().join("ours").tap_create());
    let theirs = cluster(&dir.path().join("theirs").tap_create());
    // Point our node 2 at the other volume's data file.
    let their_data = &theirs.config().node(2).unwrap().data_path;
    let before = std::fs::read(their_data).unwrap();
    let our_data = &ours.config().node(2).unwrap().data_path;
    let text = std::fs::read_to_string(ours.config_path())
        .unwrap()
        .replace(
            &our_data.display().to_string(),
            &their_data.display().to_string(),
        );
    let mixed = dir.path().join("mixed.toml");
    std::fs::write(&mixed, text).unwrap();
    let output = replblkd_secondary(&mixed, 2);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "replblkd must refuse another volume's file"
    );
    assert!(
        stderr.contains(&their_data.display().to_string()),
        "message names the file: {stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("volume"),
        "message says it is another volume's: {stderr}"
    );
    assert_eq!(
        std::fs::read(their_data).unwrap(),
        before,
        "the other volume's file is unchanged"
    );
}

trait TapCreate {
    fn tap_create(self) -> Self;
}

impl TapCreate for std::path::PathBuf {
    fn tap_create(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// Speaks to secondary 2 as a primary of `epoch`, sends `extra`, and
/// returns the Error frame it answers with (the connection then closes).
fn send_as_primary(cluster: &LocalCluster, epoch: u64, extra: &[u8]) -> (ErrorCode, String) {
    let config = cluster.config();
    let node = config.node(2).unwrap();
    let mut stream = TcpStream::connect(node.address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut bytes = Vec::new();
    Frame::Hello(Hello {
        volume_uuid: *config.volume.uuid.as_bytes(),
        node_id: 1,
        protocol_version: PROTOCOL_VERSION,
        role: Role::Primary,
        epoch,
    })
    .encode(&mut bytes);
    bytes.extend_from_slice(extra);
    stream.write_all(&bytes).unwrap();
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    let mut rest = &received[..];
    while !rest.is_empty() {
        let (frame, length) = decode_frame(rest).expect("the secondary sends valid frames");
        if let Frame::Error(error) = frame {
            return (error.code, error.message);
        }
        rest = &rest[length..];
    }
    panic!("no Error frame before the connection closed");
}

#[test]
fn a_corrupted_update_is_refused_and_nothing_is_logged() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut cluster = cluster(dir.path());
    cluster.start_secondary(2).unwrap();
    let before = cluster.log_state(2).unwrap();
    let data = vec![0xAB_u8; 4096];
    let header = UpdateHeader {
        seq: before.next_seq,
        epoch: before.epoch,
        offset_bytes: 0,
        length_bytes: 4096,
        flags: 0,
        all_acked_seq: 0,
    };
    let mut frame = Vec::new();
    encode_update_header(&header, replblk::proto::data_crc32(&data), &mut frame);
    frame.extend_from_slice(&data);
    let last = frame.len() - 1;
    frame[last] ^= 0x01; // one flipped bit in the payload
    let (code, message) = send_as_primary(&cluster, before.epoch, &frame);
    assert_eq!(code, ErrorCode::BadFrame);
    assert!(
        message.contains("crc"),
        "the error says what was wrong: {message}"
    );
    assert_eq!(
        cluster.log_state(2).unwrap(),
        before,
        "nothing was logged or applied"
    );
    let copy = std::fs::read(&cluster.config().node(2).unwrap().data_path).unwrap();
    assert!(
        copy[..4096].iter().all(|&byte| byte == 0),
        "the copy is untouched"
    );
}

#[test]
fn an_update_past_the_volume_end_is_refused() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut cluster = cluster(dir.path());
    cluster.start_secondary(2).unwrap();
    let before = cluster.log_state(2).unwrap();
    let data = vec![1u8; 4096];
    let header = UpdateHeader {
        seq: before.next_seq,
        epoch: before.epoch,
        offset_bytes: VOLUME_BYTES,
        length_bytes: 4096,
        flags: 0,
        all_acked_seq: 0,
    };
    let mut frame = Vec::new();
    Frame::Update {
        header,
        data: &data,
    }
    .encode(&mut frame);
    let (code, message) = send_as_primary(&cluster, before.epoch, &frame);
    assert_eq!(code, ErrorCode::OutOfRange, "{message}");
    assert_eq!(cluster.log_state(2).unwrap(), before, "nothing was logged");
}

#[test]
fn a_primary_of_an_older_epoch_is_refused() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut cluster = cluster(dir.path());
    cluster.start_secondary(2).unwrap();
    let before = cluster.log_state(2).unwrap();
    let (code, message) = send_as_primary(&cluster, before.epoch - 1, &[]);
    assert_eq!(code, ErrorCode::StaleEpoch, "{message}");
    assert!(
        message.contains(&format!("epoch {}", before.epoch)),
        "{message}"
    );
    assert_eq!(cluster.log_state(2).unwrap(), before);
}
