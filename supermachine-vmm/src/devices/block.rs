//! virtio-blk (device type 2) backed by a raw image file.
//!
//! One request queue. Requests are IN (read), OUT (write), FLUSH (`fdatasync`) and GET_ID; the
//! device can be read-only (`VIRTIO_BLK_F_RO`, writes fail with IOERR). Capacity is the file
//! size in 512-byte sectors, fixed at open.
//!
//! # Why a dedicated thread and blocking `pread`/`pwrite`
//! File I/O is blocking by nature (tokio's own file I/O is `spawn_blocking` underneath), so the
//! device runs one plain thread per disk that blocks on the queue's EventFd, drains every
//! available request in one batch, does the I/O straight between the file and guest memory
//! (`pread`/`pwrite` into the guest pages, no bounce buffer), and raises one interrupt per batch.
//! Compared with a tokio task that hands each batch to `spawn_blocking`, this saves a task hop
//! and a thread hand-off per batch, cannot be starved by (or starve) the user's blocking pool,
//! and needs no runtime at all. The rootfs image is read-only and hot in the page cache, so a
//! request is a memcpy; one thread per disk is plenty.
//!
//! The guest is not trusted: every descriptor chain is walked with bounds checks, sectors are
//! checked against the capacity (out of range → IOERR), malformed chains are returned with
//! nothing written, and nothing here panics on guest input.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::os::EventFd;
use tracing::{debug, error, trace, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::virtio::ring::add_used;
use super::virtio::worker_gate::{Entry, WorkerGate};
use super::virtio::{
    ActivateError, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
    VIRTIO_RING_F_EVENT_IDX,
};

/// Sector size of the virtio-blk protocol (fixed by the spec, independent of the image).
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request queue offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Request header: type (le32), reserved (le32), sector (le64).
const HEADER_LEN: usize = 16;
/// Largest number of data segments per request we advertise (SEG_MAX). Linux adds two more
/// descriptors for the header and the status byte; they must fit in the queue.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Opening a block device failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image file could not be opened or inspected.
    #[error("cannot open block image {path}")]
    Open {
        /// The image path.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

/// A virtio-blk device over a raw image file.
pub struct BlockDevice {
    file: Arc<File>,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    config: [u8; 24],
    queue_sizes: [u16; 1],
    acked_features: u64,
    worker: Option<Worker>,
    /// Set by the I/O thread when the ring is broken beyond recovery.
    needs_reset: Arc<AtomicBool>,
}

/// The running I/O thread and the means to stop it.
struct Worker {
    gate: Arc<WorkerGate>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice")
            .field("read_only", &self.read_only)
            .field("capacity_sectors", &self.capacity_sectors)
            .field("active", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl BlockDevice {
    /// Opens the image at `path` (read-only or read-write).
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self, BlockError> {
        let path = path.as_ref();
        let err = |source| BlockError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let id = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_file(file, read_only, &id).map_err(err)
    }

    /// Wraps an already open image. `id` is what GET_ID reports (truncated to 20 bytes; Linux
    /// shows it as `/sys/block/vdX/serial`).
    pub fn from_file(file: File, read_only: bool, id: &str) -> std::io::Result<Self> {
        let len = file.metadata()?.len();
        // A trailing partial sector is not addressable.
        let capacity_sectors = len / SECTOR_SIZE;
        let mut id_bytes = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = id.len().min(id_bytes.len());
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        // struct virtio_blk_config: capacity le64 @0, size_max le32 @8, seg_max le32 @12,
        // geometry @16, blk_size le32 @20. Only capacity and seg_max are offered.
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        Ok(BlockDevice {
            file: Arc::new(file),
            read_only,
            capacity_sectors,
            id: id_bytes,
            config,
            queue_sizes: [QUEUE_SIZE],
            acked_features: 0,
            worker: None,
            needs_reset: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn stop_worker(&mut self) {
        if let Some(mut w) = self.worker.take() {
            // Wait out the batch in flight, then wake the thread so it sees the closed gate.
            w.gate.close();
            if let Err(e) = w.stop.write(1) {
                warn!(%e, "waking virtio-blk thread to stop");
            }
            if let Some(t) = w.thread.take() {
                if t.join().is_err() {
                    error!("virtio-blk I/O thread panicked");
                }
            }
        }
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX);
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        copy_config(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Only `writeback` (with CONFIG_WCE, not offered) is writable.
        debug!(offset, "virtio-blk config write ignored");
    }

    fn activate(
        &mut self,
        mem: Arc<GuestMemoryMmap<()>>,
        mut queues: Vec<Queue>,
        irq: IrqTrigger,
        mut notify: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if queues.len() != 1 || notify.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let (Some(queue), Some(kick)) = (queues.pop(), notify.pop()) else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        let gate = Arc::new(WorkerGate::new([&queue]));
        let stop = Arc::new(EventFd::new(crate::os::EFD_NONBLOCK).map_err(ActivateError::Worker)?);
        let io = BlockIo {
            file: self.file.clone(),
            read_only: self.read_only,
            capacity_bytes: self.capacity_sectors * SECTOR_SIZE,
            id: self.id,
            mem,
            queue,
            irq,
            descs: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            needs_reset: self.needs_reset.clone(),
        };
        let thread = {
            let (gate, stop) = (gate.clone(), stop.clone());
            std::thread::Builder::new()
                .name("virtio-blk".into())
                .spawn(move || io.run(&kick, &stop, &gate))
                .map_err(ActivateError::Worker)?
        };
        self.worker = Some(Worker {
            gate,
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    fn pause(
        &mut self,
    ) -> Result<Option<Vec<virtio_queue::QueueState>>, crate::devices::virtio::DeviceStateError>
    {
        // Requests already submitted to the file are complete: each batch finishes its I/O.
        Ok(self.worker.as_ref().and_then(|w| w.gate.pause()))
    }

    fn resume(&mut self) {
        if let Some(w) = &self.worker {
            w.gate.resume();
        }
    }
}

impl Drop for BlockDevice {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// Copies `data.len()` bytes of `config` at `offset`; bytes past its end read as zero.
pub(crate) fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// What the I/O thread owns.
struct BlockIo {
    file: Arc<File>,
    read_only: bool,
    capacity_bytes: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    mem: Arc<GuestMemoryMmap<()>>,
    queue: Queue,
    irq: IrqTrigger,
    /// Reused for every request's descriptors (no allocation per request).
    descs: Vec<Descriptor>,
    needs_reset: Arc<AtomicBool>,
}

/// A request failed; the status byte says which way.
/// Why a request failed, as the status byte tells the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqError {
    /// `VIRTIO_BLK_S_IOERR`: the file or a guest buffer could not be read or written.
    Io,
    /// `VIRTIO_BLK_S_UNSUPP`: a request type this device does not implement.
    Unsupported,
}

impl BlockIo {
    fn run(mut self, kick: &EventFd, stop: &EventFd, gate: &WorkerGate) {
        debug!("virtio-blk I/O thread started");
        loop {
            match gate.enter() {
                Entry::Pass(mut pass) => {
                    let result = self.process_queue();
                    pass.record([&self.queue]);
                    if let Err(e) = result {
                        // A broken ring (e.g. avail index jumping past the queue size): the
                        // driver is confused or hostile; stop serving rather than guess, and
                        // report DEVICE_NEEDS_RESET.
                        error!(%e, "virtio-blk queue error; device needs reset");
                        self.needs_reset.store(true, Ordering::SeqCst);
                        break;
                    }
                }
                Entry::Paused => {
                    gate.wait_resumed();
                    continue;
                }
                Entry::Closed => break,
            }
            if !wait_readable(kick, stop) {
                break;
            }
            // Consume the kick count (the fd may be shared with an ioeventfd; non-blocking).
            let _ = kick.read();
        }
        debug!("virtio-blk I/O thread stopped");
    }

    /// Drains the queue in batches until it is empty with notifications re-enabled, then
    /// raises one interrupt if the driver wants one.
    fn process_queue(&mut self) -> Result<(), virtio_queue::Error> {
        let mem = self.mem.clone();
        let mut used_any = false;
        let mut served = 0usize;
        loop {
            self.queue.disable_notification(&*mem)?;
            loop {
                let chain = self.queue.iter(&*mem)?.next();
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                self.descs.clear();
                self.descs.extend(chain);
                let len = self.handle_request(&mem);
                add_used(&mut self.queue, &mem, head, len)?;
                used_any = true;
                served += 1;
            }
            if !self.queue.enable_notification(&*mem)? {
                break;
            }
        }
        let irq = used_any && self.queue.needs_notification(&*mem)?;
        if irq {
            if let Err(e) = self.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                warn!(%e, "virtio-blk interrupt");
            }
        }
        trace!(
            served,
            irq,
            next_avail = self.queue.next_avail(),
            "virtio-blk batch"
        );
        Ok(())
    }

    /// Serves the request in `self.descs`; returns the number of bytes written to the
    /// device-writable part of the chain (data + status), 0 if the chain is unusable.
    fn handle_request(&self, mem: &GuestMemoryMmap<()>) -> u32 {
        let descs = &self.descs;
        // Device-readable descriptors come first, then device-writable ones (§2.7.4.2).
        let split = descs
            .iter()
            .position(|d| d.is_write_only())
            .unwrap_or(descs.len());
        if descs[split..].iter().any(|d| !d.is_write_only()) {
            warn!("virtio-blk chain mixes readable after writable descriptors");
            return 0;
        }
        let (readable, writable) = descs.split_at(split);
        let Some(status_at) = last_byte(writable) else {
            warn!("virtio-blk request without a status byte");
            return 0;
        };
        let mut header = [0u8; HEADER_LEN];
        let outcome = match gather(mem, readable, 0, &mut header) {
            Ok(()) => {
                let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
                let sector = u64::from_le_bytes([
                    header[8], header[9], header[10], header[11], header[12], header[13],
                    header[14], header[15],
                ]);
                // Writable bytes excluding the status byte.
                let data_in = total_len(writable).saturating_sub(1);
                self.execute(mem, kind, sector, readable, writable, data_in)
            }
            Err(e) => {
                warn!("virtio-blk request header unreadable");
                Err(e)
            }
        };
        let (status, written) = match outcome {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(ReqError::Io) => (VIRTIO_BLK_S_IOERR, 0),
            Err(ReqError::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        if mem.write_obj(status as u8, status_at).is_err() {
            return 0;
        }
        // `written` never exceeds the writable length, which fits u32 (chains are < 4 GiB).
        u32::try_from(written + 1).unwrap_or(0)
    }

    /// Runs one request; `Ok(n)` = n data bytes written to the guest.
    fn execute(
        &self,
        mem: &GuestMemoryMmap<()>,
        kind: u32,
        sector: u64,
        readable: &[Descriptor],
        writable: &[Descriptor],
        data_in: u64,
    ) -> Result<u64, ReqError> {
        match kind {
            VIRTIO_BLK_T_IN => {
                let offset = self.check_range(sector, data_in)?;
                for_each_slice(
                    mem,
                    writable,
                    0,
                    data_in,
                    Permissions::Write,
                    |ptr, len, at| {
                        // SAFETY: `ptr` points to `len` bytes of mapped guest memory (a
                        // VolatileSlice from vm-memory, kept alive for the call); pread writes
                        // at most `len` bytes there.
                        io_loop(len, |done| unsafe {
                            libc::pread(
                                self.file.as_raw_fd(),
                                ptr.add(done).cast(),
                                len - done,
                                to_off(offset + at + done as u64),
                            )
                        })
                    },
                )?;
                Ok(data_in)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    debug!(sector, "write to read-only virtio-blk refused");
                    return Err(ReqError::Io);
                }
                let data_len = total_len(readable).saturating_sub(HEADER_LEN as u64);
                let offset = self.check_range(sector, data_len)?;
                let start = HEADER_LEN as u64;
                for_each_slice(
                    mem,
                    readable,
                    start,
                    data_len,
                    Permissions::Read,
                    |ptr, len, at| {
                        // SAFETY: `ptr` points to `len` readable bytes of mapped guest memory;
                        // pwrite only reads from it.
                        io_loop(len, |done| unsafe {
                            libc::pwrite(
                                self.file.as_raw_fd(),
                                ptr.add(done).cast(),
                                len - done,
                                to_off(offset + at + done as u64),
                            )
                        })
                    },
                )?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(|e| {
                        warn!(%e, "virtio-blk fdatasync");
                        ReqError::Io
                    })?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data_in.min(self.id.len() as u64);
                scatter(mem, writable, &self.id[..n as usize])?;
                Ok(n)
            }
            other => {
                debug!(kind = other, "unsupported virtio-blk request type");
                Err(ReqError::Unsupported)
            }
        }
    }

    /// Checks `[sector * 512, + len)` lies within the disk and is whole sectors; returns the
    /// byte offset.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, ReqError> {
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(ReqError::Io)?;
        let end = offset.checked_add(len).ok_or(ReqError::Io)?;
        if end > self.capacity_bytes || len % SECTOR_SIZE != 0 {
            debug!(
                sector,
                len,
                capacity = self.capacity_bytes,
                "virtio-blk request out of range"
            );
            return Err(ReqError::Io);
        }
        Ok(offset)
    }
}

fn to_off(v: u64) -> libc::off_t {
    // Offsets are bounded by the image size, which the kernel already fit in off_t.
    v as libc::off_t
}

/// Repeats a positional I/O call until `len` bytes are done; a short transfer that makes no
/// progress (EOF: the image shrank underneath us) or an error fails the request.
fn io_loop(len: usize, mut op: impl FnMut(usize) -> isize) -> Result<(), ReqError> {
    let mut done = 0;
    while done < len {
        let r = op(done);
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            warn!(%e, "virtio-blk file I/O");
            return Err(ReqError::Io);
        }
        if r == 0 {
            warn!("virtio-blk file I/O hit end of file");
            return Err(ReqError::Io);
        }
        done += r as usize;
    }
    Ok(())
}

fn total_len(descs: &[Descriptor]) -> u64 {
    descs.iter().map(|d| u64::from(d.len())).sum()
}

/// Guest address of the last byte of `descs` (the status byte), if any.
fn last_byte(descs: &[Descriptor]) -> Option<GuestAddress> {
    let d = descs.iter().rev().find(|d| d.len() > 0)?;
    d.addr()
        .0
        .checked_add(u64::from(d.len()) - 1)
        .map(GuestAddress)
}

/// Calls `f(host_ptr, len, offset_within_range)` for each host-contiguous piece of the byte
/// range `[skip, skip + len)` of the buffers described by `descs`.
fn for_each_slice(
    mem: &GuestMemoryMmap<()>,
    descs: &[Descriptor],
    mut skip: u64,
    len: u64,
    access: Permissions,
    mut f: impl FnMut(*mut u8, usize, u64) -> Result<(), ReqError>,
) -> Result<(), ReqError> {
    let mut left = len;
    let mut at = 0u64;
    for d in descs {
        if left == 0 {
            break;
        }
        let dlen = u64::from(d.len());
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let take = (dlen - skip).min(left);
        let start = d.addr().0.checked_add(skip).ok_or(ReqError::Io)?;
        skip = 0;
        let slices = mem
            .get_slices(GuestAddress(start), take as usize, access)
            .map_err(|_| ReqError::Io)?;
        for slice in slices {
            let slice = slice.map_err(|e| {
                debug!(%e, "virtio-blk buffer outside guest memory");
                ReqError::Io
            })?;
            let guard = slice.ptr_guard_mut();
            f(guard.as_ptr(), slice.len(), at)?;
            at += slice.len() as u64;
        }
        left -= take;
    }
    if left != 0 {
        return Err(ReqError::Io);
    }
    Ok(())
}

/// Reads `out.len()` bytes from the buffers `descs`, starting `skip` bytes in.
fn gather(
    mem: &GuestMemoryMmap<()>,
    descs: &[Descriptor],
    skip: u64,
    out: &mut [u8],
) -> Result<(), ReqError> {
    let mut filled = 0usize;
    let mut skip = skip;
    for d in descs {
        if filled == out.len() {
            break;
        }
        let dlen = u64::from(d.len());
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let take = ((dlen - skip) as usize).min(out.len() - filled);
        let at = d.addr().0.checked_add(skip).ok_or(ReqError::Io)?;
        mem.read_slice(&mut out[filled..filled + take], GuestAddress(at))
            .map_err(|_| ReqError::Io)?;
        filled += take;
        skip = 0;
    }
    if filled == out.len() {
        Ok(())
    } else {
        Err(ReqError::Io)
    }
}

/// Writes `data` into the buffers `descs` from their start.
fn scatter(mem: &GuestMemoryMmap<()>, descs: &[Descriptor], data: &[u8]) -> Result<(), ReqError> {
    let mut done = 0usize;
    for d in descs {
        if done == data.len() {
            break;
        }
        let take = (d.len() as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + take], d.addr())
            .map_err(|_| ReqError::Io)?;
        done += take;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err(ReqError::Io)
    }
}

/// Blocks until `kick` or `stop` is readable; false when `stop` fired (or polling failed).
fn wait_readable(kick: &EventFd, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            error!(%e, "virtio-blk poll");
            return false;
        }
        return fds[1].revents == 0;
    }
}

#[cfg(test)]
mod tests;
