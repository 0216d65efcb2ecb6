//! Bad input gets a clear error and changes nothing: a misspelt config
//! field, another volume's file, a corrupted frame, a stale primary, a
//! LogRead of records the log does not hold, a primary started on a
//! kernel without ublk and a connection to the running primary that is not
//! a tool's are each refused, saying what and where, and no log, copy or
//! connection moves.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use replblk::config::ReplicationConfig;
use replblk::net::{query_node, NodeReport};
use replblk::node::local_cluster::{LocalCluster, PRIMARY_NODE_ID};
use replblk::node::volume::Volume;
use replblk::proto::{
    decode_frame, encode_update_header, ErrorCode, ErrorFrame, Frame, Hello, LogState, Role,
    UpdateHeader, PROTOCOL_VERSION, UPDATE_FLAG_FUA,
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
fn a_primary_without_ublk_refuses_at_once_naming_the_way_out() {
    if Path::new("/dev/ublk-control").exists() {
        eprintln!("this kernel has ublk: the refusal does not apply here");
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut cluster = cluster(dir.path());
    cluster.start_secondaries().expect("secondary up");
    let mut primary = Command::new(REPLBLKD)
        .args(["primary", "--config"])
        .arg(cluster.config_path())
        .args(["--node", "1"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("replblkd runs");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = primary.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            primary.kill().unwrap();
            primary.wait().unwrap();
            panic!("the primary did not refuse within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    primary
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("modprobe ublk_drv") && stderr.contains("--no-device"),
        "{stderr}"
    );
    // Refused before the engine started: the secondary never saw it.
    let state = cluster.log_state(2).expect("secondary answers");
    assert_eq!(state.next_seq, 1);
    assert!(
        !cluster.output(2).contains("primary connected"),
        "{}",
        cluster.output(2)
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

/// A frame read by [`FrameStream`], owning its data.
#[derive(Debug)]
enum Received {
    Update(UpdateHeader, Vec<u8>),
    Other(Frame<'static>),
}

/// A primary's side of a connection to secondary 2, speaking frames over a
/// blocking socket with a read timeout.
struct FrameStream {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl FrameStream {
    /// Connects as a primary of `epoch` and takes the secondary's Hello and
    /// LogState.
    fn connect(cluster: &LocalCluster, epoch: u64) -> (FrameStream, LogState) {
        let config = cluster.config();
        let stream = TcpStream::connect(config.node(2).unwrap().address).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut connection = FrameStream {
            stream,
            buffer: Vec::new(),
        };
        connection.send(&Frame::Hello(Hello {
            volume_uuid: *config.volume.uuid.as_bytes(),
            node_id: 1,
            protocol_version: PROTOCOL_VERSION,
            role: Role::Primary,
            epoch,
        }));
        assert!(matches!(
            connection.next(),
            Some(Received::Other(Frame::Hello(_)))
        ));
        let Some(Received::Other(Frame::LogState(log))) = connection.next() else {
            panic!("expected LogState");
        };
        (connection, log)
    }

    fn send(&mut self, frame: &Frame<'_>) {
        let mut bytes = Vec::new();
        frame.encode(&mut bytes);
        self.stream.write_all(&bytes).unwrap();
    }

    /// The next frame, or None once the secondary closed the connection.
    fn next(&mut self) -> Option<Received> {
        loop {
            match decode_frame(&self.buffer) {
                Ok((frame, length)) => {
                    let received = match frame {
                        Frame::Update { header, data } => Received::Update(header, data.to_vec()),
                        Frame::Hello(hello) => Received::Other(Frame::Hello(hello)),
                        Frame::Ack(ack) => Received::Other(Frame::Ack(ack)),
                        Frame::LogState(log) => Received::Other(Frame::LogState(log)),
                        Frame::LogReadEnd { next_seq } => {
                            Received::Other(Frame::LogReadEnd { next_seq })
                        }
                        Frame::Error(error) => Received::Other(Frame::Error(error)),
                        other => panic!("a secondary sent {:?}", other.kind()),
                    };
                    self.buffer.drain(..length);
                    return Some(received);
                }
                Err(error) if error.is_truncated() => {
                    let mut chunk = vec![0u8; 1 << 16];
                    let read = self.stream.read(&mut chunk).expect("read within 10 s");
                    if read == 0 {
                        return None;
                    }
                    self.buffer.extend_from_slice(&chunk[..read]);
                }
                Err(error) => panic!("the secondary sent a bad frame: {error}"),
            }
        }
    }

    /// Frames until an Error, which it returns; panics if none comes.
    fn error(&mut self) -> ErrorFrame {
        while let Some(received) = self.next() {
            if let Received::Other(Frame::Error(error)) = received {
                return error;
            }
        }
        panic!("the connection closed without an Error frame");
    }
}

fn record_data(seq: u64) -> Vec<u8> {
    (0..8192u64).map(|i| (i * 7 + seq * 13) as u8).collect()
}

#[test]
fn a_log_read_returns_the_records_and_refuses_what_the_log_does_not_hold() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut cluster = cluster(dir.path());
    cluster.start_secondary(2).unwrap();
    // A primary logs seqs 1..=3 (the second with FUA), then goes away.
    let (mut first, log) = FrameStream::connect(&cluster, 1);
    assert_eq!((log.start_seq, log.next_seq), (1, 1));
    for seq in 1..=3 {
        let data = record_data(seq);
        first.send(&Frame::Update {
            header: UpdateHeader {
                seq,
                epoch: log.epoch,
                offset_bytes: seq * 8192,
                length_bytes: 8192,
                flags: if seq == 2 { UPDATE_FLAG_FUA } else { 0 },
                all_acked_seq: 0,
            },
            data: &data,
        });
    }
    while !matches!(
        first.next(),
        Some(Received::Other(Frame::Ack(ack))) if ack.logged_seq == 3
    ) {}
    drop(first);

    // A restarted primary reads them back, with their own seq, epoch,
    // offset, flags and bytes.
    let (mut second, log) = FrameStream::connect(&cluster, 1);
    assert_eq!((log.start_seq, log.next_seq), (1, 4));
    // Settled: every record applied (nothing is cleared without AllAcked).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let before = loop {
        let state = cluster.log_state(2).unwrap();
        if state.applied_seq == 3 {
            break state;
        }
        assert!(std::time::Instant::now() < deadline, "{state:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    second.send(&Frame::LogRead {
        from_seq: 2,
        to_seq: 4,
    });
    for seq in 2..4 {
        let received = loop {
            match second.next() {
                Some(Received::Other(Frame::Ack(_))) => continue,
                other => break other,
            }
        };
        let Some(Received::Update(header, data)) = received else {
            panic!("expected record {seq}, got {received:?}");
        };
        assert_eq!(
            (header.seq, header.epoch, header.offset_bytes),
            (seq, log.epoch, seq * 8192)
        );
        assert_eq!(header.fua(), seq == 2, "the FUA flag as logged");
        assert_eq!(header.all_acked_seq, 0);
        assert!(data == record_data(seq), "record {seq}'s bytes");
    }
    assert!(matches!(
        second.next(),
        Some(Received::Other(Frame::LogReadEnd { next_seq: 4 }))
    ));
    // Past the end of the log: refused, saying what the log holds.
    second.send(&Frame::LogRead {
        from_seq: 3,
        to_seq: 5,
    });
    let error = second.error();
    assert_eq!(error.code, ErrorCode::NotInLog, "{}", error.message);
    assert!(error.message.contains("1..4"), "{}", error.message);
    assert_eq!(
        cluster.log_state(2).unwrap(),
        before,
        "reading changed nothing"
    );

    // Once updates flow, the log may be overwritten: no more LogRead.
    let (mut third, log) = FrameStream::connect(&cluster, 1);
    let data = record_data(4);
    third.send(&Frame::Update {
        header: UpdateHeader {
            seq: log.next_seq,
            epoch: log.epoch,
            offset_bytes: 0,
            length_bytes: 8192,
            flags: 0,
            all_acked_seq: 0,
        },
        data: &data,
    });
    third.send(&Frame::LogRead {
        from_seq: 1,
        to_seq: 2,
    });
    let error = third.error();
    assert_eq!(error.code, ErrorCode::BadFrame, "{}", error.message);
    assert!(error.message.contains("LogRead"), "{}", error.message);
}

/// Connects to `address` with `hello` and returns the Error frame the peer
/// answers with before closing.
fn refused(address: std::net::SocketAddr, hello: Hello) -> (ErrorCode, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut bytes = Vec::new();
    Frame::Hello(hello).encode(&mut bytes);
    stream.write_all(&bytes).unwrap();
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    match decode_frame(&received) {
        Ok((Frame::Error(error), _)) => (error.code, error.message),
        other => panic!("expected an Error frame, got {other:?}"),
    }
}

#[test]
fn the_running_primary_answers_tools_only() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut cluster = cluster(dir.path());
    cluster.start_secondary(2).unwrap();
    let volume = Volume::start(cluster.config(), PRIMARY_NODE_ID).expect("primary starts");
    let config = cluster.config();
    let address = config.node(PRIMARY_NODE_ID).unwrap().address;
    let volume_uuid = *config.volume.uuid.as_bytes();
    let hello = |volume_uuid, role| Hello {
        volume_uuid,
        node_id: 9,
        protocol_version: PROTOCOL_VERSION,
        role,
        epoch: 1,
    };
    let (code, message) = refused(address, hello(volume_uuid, Role::Secondary));
    assert_eq!(code, ErrorCode::BadFrame, "{message}");
    assert!(message.contains("tools only"), "{message}");
    let (code, message) = refused(address, hello(volume_uuid, Role::Primary));
    assert_eq!(code, ErrorCode::BadFrame, "{message}");
    let (code, message) = refused(address, hello([0xAB; 16], Role::Tool));
    assert_eq!(code, ErrorCode::WrongVolume, "{message}");
    // The refusals changed nothing: a tool is still answered, and the
    // primary still reaches its secondary.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let report = query_node(address, volume_uuid, Duration::from_secs(5));
        let Ok(NodeReport::Primary {
            hello,
            volume: state,
        }) = &report
        else {
            panic!("the primary answers a tool: {report:?}");
        };
        assert_eq!(hello.node_id, PRIMARY_NODE_ID);
        let members: Vec<u32> = state.members.iter().map(|member| member.node_id).collect();
        assert_eq!(members, vec![2]);
        if state.members[0].connected {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "secondary 2 not connected after 10 s: {state:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    volume.stop().expect("the primary stops cleanly");
}
