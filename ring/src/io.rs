//! Files and TCP sockets on the ring: what the engine thread reads, writes
//! and sends, each call one or more [`Op`]s.
//!
//! Every operation holds a reference to its descriptor (`Rc<OwnedFd>`) as
//! well as its buffer, so that neither is closed nor freed before the
//! kernel is done, also when the future is dropped first.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;

use compio_buf::{IoBuf, IoBufMut};
use io_uring::{opcode, squeue, types};

use super::{FixedFile, Op};

/// `$make`, with `$target` the file as io_uring names it: its index in the
/// ring's table if `$fixed` has one, else its descriptor `$fd`.
macro_rules! on_file {
    ($fixed:expr, $fd:expr, |$target:ident| $make:expr) => {
        match $fixed {
            Some(index) => {
                let $target = types::Fixed(index);
                $make
            }
            None => {
                let $target = types::Fd($fd);
                $make
            }
        }
    };
}

/// A buffer whose bytes live on the heap, so that they stay where they are
/// when the value moves into an operation.
///
/// # Safety
///
/// `as_init` (and `as_uninit`, where implemented) must point at the same
/// memory however the value is moved, for as long as it lives.
pub unsafe trait StableBuf: IoBuf + 'static {}

// SAFETY: a Vec's bytes are on the heap.
unsafe impl StableBuf for Vec<u8> {}

fn result(code: i32) -> io::Result<usize> {
    if code < 0 {
        Err(io::Error::from_raw_os_error(-code))
    } else {
        Ok(code as usize)
    }
}

/// Where an operation repeated until `total` bytes are done stands after
/// one completion with `code`, `done` bytes before it: the bytes done now,
/// or the error that ends it. A result of 0 bytes before the end is a
/// `zero` error; an interrupted operation did nothing and is tried again.
fn step(code: i32, done: usize, total: usize, zero: io::ErrorKind) -> io::Result<usize> {
    match result(code) {
        Ok(0) if done < total => Err(zero.into()),
        Ok(count) => Ok(done + count),
        Err(error) if error.kind() == io::ErrorKind::Interrupted => Ok(done),
        Err(error) => Err(error),
    }
}

/// Repeats an operation until `total` bytes of `buf` are done: `entry(buf,
/// done, length)` makes the entry for the `length` bytes from `done` on
/// (pointing into `buf`'s heap bytes only), as [`step`] says. Each operation
/// holds a clone of `fd` (what keeps the file open, and registered) until
/// it completes.
async fn all_of<B: StableBuf, D: 'static>(
    fd: &Rc<D>,
    mut buf: B,
    total: usize,
    zero: io::ErrorKind,
    entry: impl Fn(&mut B, usize, u32) -> squeue::Entry,
) -> (io::Result<()>, B) {
    let mut done = 0;
    while done < total {
        let length = u32::try_from(total - done).unwrap_or(u32::MAX);
        let entry = entry(&mut buf, done, length);
        // SAFETY: the entry points into `buf`'s heap bytes (the contract of
        // `entry`); the operation owns `buf` and the descriptor.
        let (code, (_, returned)) = unsafe { Op::new(entry, (fd.clone(), buf)) }.await;
        buf = returned;
        match step(code, done, total, zero) {
            Ok(now_done) => done = now_done,
            Err(error) => return (Err(error), buf),
        }
    }
    (Ok(()), buf)
}

/// The entry writing `length` bytes from `from` at `offset_bytes` of the
/// file.
fn write_entry(
    fd: &FileDescriptor,
    from: *const u8,
    length: u32,
    offset_bytes: u64,
) -> squeue::Entry {
    let fixed = fd.fixed.as_ref().map(FixedFile::index);
    on_file!(fixed, fd.as_raw_fd(), |file| opcode::Write::new(
        file, from, length
    )
    .offset(offset_bytes)
    .build())
}

/// Writes `buf[done..total]` at `offset_bytes + done`, again after a short
/// or interrupted write, then calls `then`. Always submits at least once,
/// so that `then` runs from the ring's loop, not from the caller.
fn write_from<B: StableBuf, F: FnOnce(io::Result<()>, B) + 'static>(
    fd: Rc<FileDescriptor>,
    buf: B,
    offset_bytes: u64,
    done: usize,
    total: usize,
    then: F,
) {
    let length = u32::try_from(total - done).unwrap_or(u32::MAX);
    let from = IoBuf::as_init(&buf)[done..].as_ptr();
    let entry = write_entry(&fd, from, length, offset_bytes + done as u64);
    let next = move |code: i32, (fd, buf): (Rc<FileDescriptor>, B)| match step(
        code,
        done,
        total,
        io::ErrorKind::WriteZero,
    ) {
        Ok(now_done) if now_done >= total => then(Ok(()), buf),
        Ok(now_done) => write_from(fd, buf, offset_bytes, now_done, total, then),
        Err(error) => then(Err(error), buf),
    };
    // SAFETY: the entry points into `buf`'s heap bytes (`StableBuf`), and
    // the operation owns `buf` and the descriptor until it completes.
    unsafe { crate::submit(entry, (fd, buf), next) };
}

/// A file read and written through the ring.
pub struct File {
    /// Held by every operation on the file too: neither its descriptor nor
    /// its entry in the ring's table goes (and the entry cannot be handed
    /// to another file) while an operation may still name them.
    fd: Rc<FileDescriptor>,
}

/// A file's descriptor and its entry in the ring's table of files, if it
/// got one. The entry goes first.
struct FileDescriptor {
    fixed: Option<FixedFile>,
    fd: OwnedFd,
}

impl AsRawFd for FileDescriptor {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl File {
    /// `file`, opened already, as a file of the ring. Inside
    /// [`crate::Ring::block_on`] it is registered with the ring, when the
    /// ring's table has room ([`crate::register_file`]).
    pub fn from_std(file: std::fs::File) -> File {
        let fd = OwnedFd::from(file);
        let fixed = crate::register_file(fd.as_raw_fd());
        File {
            fd: Rc::new(FileDescriptor { fixed, fd }),
        }
    }

    fn fixed_index(&self) -> Option<u32> {
        self.fd.fixed.as_ref().map(FixedFile::index)
    }

    /// Writes all of `buf` at `offset_bytes`.
    pub async fn write_all_at<B: StableBuf>(
        &self,
        buf: B,
        offset_bytes: u64,
    ) -> (io::Result<()>, B) {
        let total = buf.as_init().len();
        let fd = &*self.fd;
        all_of(
            &self.fd,
            buf,
            total,
            io::ErrorKind::WriteZero,
            |buf: &mut B, done: usize, length: u32| {
                let from = IoBuf::as_init(&*buf)[done..].as_ptr();
                write_entry(fd, from, length, offset_bytes + done as u64)
            },
        )
        .await
    }

    /// Submits one write of `bytes` at `offset_bytes` and tells
    /// `completions` its result under `token`, as [`crate::submit_to`]
    /// says: the bytes written (a short write is the caller's to continue)
    /// or -errno. Where [`File::write_all_at_then`] allocates its callback,
    /// this costs a reference count.
    ///
    /// # Safety
    ///
    /// `bytes` stay valid and unchanged, and this file open, until the
    /// completion (`completions` may own both: it lives that long).
    pub unsafe fn write_at_to(
        &self,
        bytes: &[u8],
        offset_bytes: u64,
        completions: Rc<dyn crate::Completions>,
        token: u64,
    ) {
        let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let entry = write_entry(&self.fd, bytes.as_ptr(), length, offset_bytes);
        // SAFETY: the caller's promise.
        unsafe { crate::submit_to(entry, completions, token) };
    }

    /// As [`File::write_all_at`], without a future: `then` gets the
    /// outcome and `buf` back, called from the ring's loop as
    /// [`crate::submit`] says (never from inside this call).
    pub fn write_all_at_then<B: StableBuf>(
        &self,
        buf: B,
        offset_bytes: u64,
        then: impl FnOnce(io::Result<()>, B) + 'static,
    ) {
        let total = buf.as_init().len();
        write_from(self.fd.clone(), buf, offset_bytes, 0, total, then);
    }

    /// Fills all of `buf` from `offset_bytes`.
    pub async fn read_exact_at<B: StableBuf + IoBufMut>(
        &self,
        mut buf: B,
        offset_bytes: u64,
    ) -> (io::Result<()>, B) {
        let total = buf.as_uninit().len();
        let (fd, fixed) = (self.fd.as_raw_fd(), self.fixed_index());
        all_of(
            &self.fd,
            buf,
            total,
            io::ErrorKind::UnexpectedEof,
            |buf: &mut B, done: usize, length: u32| {
                let into = buf.as_uninit()[done..].as_mut_ptr().cast();
                on_file!(fixed, fd, |file| opcode::Read::new(file, into, length)
                    .offset(offset_bytes + done as u64)
                    .build())
            },
        )
        .await
    }

    /// fdatasync.
    pub async fn sync_data(&self) -> io::Result<()> {
        let entry = on_file!(self.fixed_index(), self.fd.as_raw_fd(), |file| {
            opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
        });
        // SAFETY: the entry points at nothing but the descriptor it owns.
        let (code, _) = unsafe { Op::new(entry, self.fd.clone()) }.await;
        result(code).map(|_| ())
    }
}

/// A connected TCP socket on the ring.
pub struct TcpStream {
    fd: Rc<OwnedFd>,
}

impl TcpStream {
    /// Connects to `address`, with TCP_NODELAY set.
    pub async fn connect(address: SocketAddr) -> io::Result<TcpStream> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(address),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_tcp_nodelay(true)?;
        let fd = Rc::new(OwnedFd::from(socket));
        let address = Box::new(socket2::SockAddr::from(address));
        let entry = opcode::Connect::new(
            types::Fd(fd.as_raw_fd()),
            address.as_ptr().cast(),
            address.len(),
        )
        .build();
        // SAFETY: the entry points at the boxed address the operation owns.
        let (code, _) = unsafe { Op::new(entry, (fd.clone(), address)) }.await;
        result(code)?;
        Ok(TcpStream { fd })
    }

    /// An accepted or otherwise connected std socket.
    pub fn from_std(stream: std::net::TcpStream) -> io::Result<TcpStream> {
        stream.set_nonblocking(false)?;
        Ok(TcpStream {
            fd: Rc::new(OwnedFd::from(stream)),
        })
    }

    fn sock(&self) -> socket2::SockRef<'_> {
        socket2::SockRef::from(&*self.fd)
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.sock()
            .peer_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("peer is not an IP address"))
    }

    /// Receives into `buf[range]`; 0 when the peer closed.
    pub async fn read_into<B: StableBuf + IoBufMut>(
        &self,
        mut buf: B,
        range: Range<usize>,
    ) -> (io::Result<usize>, B) {
        let bytes = &mut buf.as_uninit()[range];
        let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let entry = opcode::Recv::new(
            types::Fd(self.fd.as_raw_fd()),
            bytes.as_mut_ptr().cast(),
            length,
        )
        .build();
        // SAFETY: the entry points into `buf`'s heap bytes; the operation
        // owns `buf` and the descriptor.
        let (code, (_, buf)) = unsafe { Op::new(entry, (self.fd.clone(), buf)) }.await;
        (result(code), buf)
    }

    /// Sends from `pieces` in order, as much as one `sendmsg` takes.
    pub async fn write_pieces<B: StableBuf>(&self, pieces: Vec<B>) -> (io::Result<usize>, Vec<B>) {
        let iovecs: Box<[libc::iovec]> = pieces
            .iter()
            .map(|piece| {
                let bytes = piece.as_init();
                libc::iovec {
                    iov_base: bytes.as_ptr() as *mut libc::c_void,
                    iov_len: bytes.len(),
                }
            })
            .collect();
        // SAFETY: an all-zero msghdr is a valid empty one.
        let mut header: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        header.msg_iov = iovecs.as_ptr() as *mut libc::iovec;
        header.msg_iovlen = iovecs.len();
        let entry = opcode::SendMsg::new(types::Fd(self.fd.as_raw_fd()), &*header)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        // SAFETY: the entry points at the boxed header, which points at the
        // boxed iovecs, which point into the pieces' heap bytes: all owned
        // by the operation, with the descriptor.
        let (code, (_, _, _, pieces)) =
            unsafe { Op::new(entry, (self.fd.clone(), header, iovecs, pieces)) }.await;
        (result(code), pieces)
    }

    /// Sends all of `bytes`.
    pub async fn write_all_bytes(&self, bytes: Vec<u8>) -> io::Result<()> {
        let total = bytes.len();
        let fd = self.fd.as_raw_fd();
        all_of(
            &self.fd,
            bytes,
            total,
            io::ErrorKind::WriteZero,
            |bytes: &mut Vec<u8>, done: usize, length: u32| {
                opcode::Send::new(types::Fd(fd), bytes[done..].as_ptr(), length)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
            },
        )
        .await
        .0
    }

    /// Shuts both directions down, which ends the peer's reads and ours.
    pub fn shutdown_both(&self) {
        let _ = self.sock().shutdown(std::net::Shutdown::Both);
    }
}

/// A listening TCP socket on the ring.
pub struct TcpListener {
    fd: Rc<OwnedFd>,
}

impl TcpListener {
    /// A bound, listening std socket.
    pub fn from_std(listener: std::net::TcpListener) -> io::Result<TcpListener> {
        listener.set_nonblocking(false)?;
        Ok(TcpListener {
            fd: Rc::new(OwnedFd::from(listener)),
        })
    }

    /// The next connection and its peer's address.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        let entry = opcode::Accept::new(
            types::Fd(self.fd.as_raw_fd()),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC)
        .build();
        // SAFETY: no address is asked for; the operation owns the descriptor.
        let (code, _) = unsafe { Op::new(entry, self.fd.clone()) }.await;
        let fd = result(code)? as i32;
        // SAFETY: a descriptor the kernel just created for us.
        let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        Ok((TcpStream::from_std(stream)?, peer))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        socket2::SockRef::from(&*self.fd)
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("listening on a non-IP address"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{spawn, Ring};

    #[test]
    fn bytes_sent_in_pieces_arrive_in_order_and_whole() {
        let ring = Ring::new().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let sent: Vec<u8> = (0..300_000_u32).map(|i| (i % 253) as u8).collect();
        let expected = sent.clone();
        let received = ring.block_on(async move {
            let accepting = spawn(async move { listener.accept().await.unwrap().0 });
            let client = TcpStream::connect(address).await.unwrap();
            let server = accepting.await;
            let sending = spawn(async move {
                // Two small pieces go out in one sendmsg on an idle socket.
                let pieces = vec![sent[..1000].to_vec(), sent[1000..2000].to_vec()];
                let (result, _) = client.write_pieces(pieces).await;
                assert_eq!(result.unwrap(), 2000);
                client.write_all_bytes(sent[2000..].to_vec()).await.unwrap();
                client.write_all_bytes(b"end".to_vec()).await.unwrap();
                client.shutdown_both();
            });
            let mut received = Vec::new();
            let mut buf = vec![0_u8; 65536];
            loop {
                let (result, returned) = server.read_into(buf, 0..65536).await;
                buf = returned;
                let read = result.unwrap();
                if read == 0 {
                    break;
                }
                received.extend_from_slice(&buf[..read]);
            }
            sending.await;
            received
        });
        assert_eq!(received.len(), expected.len() + 3);
        assert_eq!(&received[..expected.len()], &expected[..]);
        assert_eq!(&received[expected.len()..], b"end");
    }

    #[test]
    fn a_file_reads_back_what_was_written_and_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        let std_file = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let ring = Ring::new().unwrap();
        let (written, read) = ring.block_on(async move {
            let file = File::from_std(std_file);
            let data: Vec<u8> = (0..100_000_u32).map(|i| (i % 241) as u8).collect();
            let (result, data) = file.write_all_at(data, 8192).await;
            result.unwrap();
            file.sync_data().await.unwrap();
            let (result, back) = file.read_exact_at(vec![0_u8; 100_000], 8192).await;
            result.unwrap();
            (data, back)
        });
        assert_eq!(written, read);
        let (result, _) = ring.block_on(async {
            let file = File::from_std(std::fs::File::open(&path).unwrap());
            file.read_exact_at(vec![0_u8; 4096], 200_000).await
        });
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_write_told_by_token_lands_and_reports_its_bytes() {
        #[derive(Default)]
        struct Told(std::cell::RefCell<Vec<(u64, i32)>>);
        impl crate::Completions for Told {
            fn completed(self: Rc<Self>, token: u64, result: i32) {
                self.0.borrow_mut().push((token, result));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        let std_file = std::fs::File::create_new(&path).unwrap();
        let ring = Ring::new().unwrap();
        let data: Vec<u8> = (0..8192_u32).map(|i| (i % 251) as u8).collect();
        let told = Rc::new(Told::default());
        let told_in_ring = told.clone();
        let bytes = data.clone();
        ring.block_on(async move {
            let file = File::from_std(std_file);
            // SAFETY: `bytes` and `file` live until after the completion,
            // which the sleep waits out.
            unsafe { file.write_at_to(&bytes, 512, told_in_ring.clone(), 42) };
            assert!(told_in_ring.0.borrow().is_empty(), "told from the loop");
            while told_in_ring.0.borrow().is_empty() {
                crate::sleep(std::time::Duration::from_millis(1)).await;
            }
        });
        assert_eq!(*told.0.borrow(), vec![(42, 8192)]);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[512..], &data[..]);
    }

    #[test]
    fn a_write_with_a_callback_lands_and_reports_once_from_the_loop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy");
        let std_file = std::fs::File::create_new(&path).unwrap();
        let ring = Ring::new().unwrap();
        let data: Vec<u8> = (0..70_000_u32).map(|i| (i % 239) as u8).collect();
        let expected = data.clone();
        let outcomes = ring.block_on(async move {
            let file = File::from_std(std_file);
            let outcomes = Rc::new(std::cell::RefCell::new(Vec::new()));
            let (sender, receiver) = tokio::sync::oneshot::channel();
            let record = outcomes.clone();
            file.write_all_at_then(data, 4096, move |result, buf: Vec<u8>| {
                record
                    .borrow_mut()
                    .push((result.map_err(|e| e.kind()), buf.len()));
                let _ = sender.send(());
            });
            assert!(
                outcomes.borrow().is_empty(),
                "the callback waits for the loop"
            );
            receiver.await.unwrap();
            outcomes.take()
        });
        assert_eq!(outcomes, vec![(Ok(()), 70_000)]);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), 4096 + 70_000);
        assert!(on_disk[..4096].iter().all(|&byte| byte == 0));
        assert_eq!(&on_disk[4096..], &expected[..]);
    }

    #[test]
    fn a_failed_write_with_a_callback_reports_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("read-only");
        std::fs::write(&path, b"x").unwrap();
        let ring = Ring::new().unwrap();
        let kind = ring.block_on(async move {
            let file = File::from_std(std::fs::File::open(&path).unwrap());
            let (sender, receiver) = tokio::sync::oneshot::channel();
            file.write_all_at_then(vec![1_u8; 512], 0, move |result, _: Vec<u8>| {
                let _ = sender.send(result.map_err(|e| e.raw_os_error()));
            });
            receiver.await.unwrap()
        });
        assert_eq!(kind, Err(Some(libc::EBADF)));
    }
}
