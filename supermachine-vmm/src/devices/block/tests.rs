//! virtio-blk driven by the fake guest driver over real guest memory and a temp file.

use std::io::{Read, Seek, SeekFrom, Write};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;

use super::{BlockDevice, SECTOR_SIZE};
use crate::devices::virtio::test_driver::{Buf, GuestDriver};
use crate::devices::virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

const SECTORS: u64 = 64;
const ALL: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_EVENT_IDX
    | (1 << VIRTIO_BLK_F_FLUSH)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_RO);

/// Byte `i` of the image.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

fn image() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..SECTORS * SECTOR_SIZE).map(pattern).collect();
    f.write_all(&data).unwrap();
    // A trailing partial sector that must not be addressable.
    f.write_all(&[0xee; 100]).unwrap();
    f.flush().unwrap();
    f
}

fn file_bytes(f: &tempfile::NamedTempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut file = f.reopen().unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut v = vec![0u8; len];
    file.read_exact(&mut v).unwrap();
    v
}

fn driver(f: &tempfile::NamedTempFile, read_only: bool) -> GuestDriver {
    let dev = BlockDevice::open(f.path(), read_only).unwrap();
    assert_eq!(dev.capacity_sectors(), SECTORS);
    let mut d = GuestDriver::new(Box::new(dev));
    d.init(ALL, &[128]);
    d
}

fn header(d: &mut GuestDriver, kind: u32, sector: u64) -> u64 {
    let at = d.alloc(16);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    d.write_mem(at, &h);
    at
}

struct Done {
    status: u8,
    used_len: u32,
    data: Vec<u8>,
}

/// Posts one request (header, data, status in separate descriptors, as Linux does), kicks
/// and waits for completion.
fn request(d: &mut GuestDriver, kind: u32, sector: u64, out: &[u8], in_len: u32) -> Done {
    let hdr = header(d, kind, sector);
    let mut bufs = vec![Buf::ro(hdr, 16)];
    if !out.is_empty() {
        let at = d.alloc(out.len() as u32);
        d.write_mem(at, out);
        bufs.push(Buf::ro(at, out.len() as u32));
    }
    let data_at = d.alloc(in_len);
    if in_len > 0 {
        d.write_mem(data_at, &vec![0xaa; in_len as usize]);
        bufs.push(Buf::wo(data_at, in_len));
    }
    let status_at = d.alloc(1);
    d.write_mem(status_at, &[0xff]);
    bufs.push(Buf::wo(status_at, 1));
    let head = d.add_chain(0, &bufs);
    d.kick(0);
    d.wait_used_blocking(0, 1);
    let (id, used_len) = d.pop_used(0).unwrap();
    assert_eq!(id, head);
    Done {
        status: d.read_mem(status_at, 1)[0],
        used_len,
        data: d.read_mem(data_at, in_len as usize),
    }
}

#[test]
fn advertises_capacity_flush_and_read_only() {
    let f = image();
    let mut d = GuestDriver::new(Box::new(BlockDevice::open(f.path(), true).unwrap()));
    assert_eq!(d.read32(reg::VIRTIO_MMIO_DEVICE_ID), 2);
    let features = d.device_features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(features & VIRTIO_RING_F_EVENT_IDX, 0);
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    let cap = d.read_config(0, 8);
    assert_eq!(u64::from_le_bytes(cap.try_into().unwrap()), SECTORS);
    // Linux reads the 64-bit capacity as two 32-bit halves.
    assert_eq!(d.read_config(0, 4), (SECTORS as u32).to_le_bytes());
    assert_eq!(d.read_config(4, 4), [0; 4]);
    assert_eq!(d.read_config(12, 4), 254u32.to_le_bytes(), "seg_max");

    let rw =
        GuestDriver::new(Box::new(BlockDevice::open(f.path(), false).unwrap())).device_features();
    assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
}

#[test]
fn reads_sectors() {
    let f = image();
    let mut d = driver(&f, true);
    let r = request(&mut d, VIRTIO_BLK_T_IN, 3, &[], 3 * 512);
    assert_eq!(r.status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(r.used_len, 3 * 512 + 1);
    let want: Vec<u8> = (3 * 512..6 * 512).map(pattern).collect();
    assert_eq!(r.data, want);
    // The last whole sector is readable.
    let r = request(&mut d, VIRTIO_BLK_T_IN, SECTORS - 1, &[], 512);
    assert_eq!(r.status, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn writes_reach_the_file_and_read_back() {
    let f = image();
    let mut d = driver(&f, false);
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    let w = request(&mut d, VIRTIO_BLK_T_OUT, 10, &data, 0);
    assert_eq!(w.status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(w.used_len, 1, "only the status byte is written for OUT");
    assert_eq!(file_bytes(&f, 10 * 512, 1024), data);
    // Neighbours untouched.
    assert_eq!(
        file_bytes(&f, 9 * 512, 512),
        (9 * 512..10 * 512).map(pattern).collect::<Vec<_>>()
    );
    let r = request(&mut d, VIRTIO_BLK_T_IN, 10, &[], 1024);
    assert_eq!(r.data, data);
    let fl = request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    assert_eq!(fl.status, VIRTIO_BLK_S_OK as u8);
    assert_eq!(fl.used_len, 1);
}

#[test]
fn out_of_range_requests_fail_with_ioerr() {
    let f = image();
    let mut d = driver(&f, false);
    let before = file_bytes(&f, 0, (SECTORS * 512) as usize);
    for (kind, sector, out, in_len) in [
        (VIRTIO_BLK_T_IN, SECTORS, vec![], 512u32),
        (VIRTIO_BLK_T_IN, SECTORS - 1, vec![], 1024),
        (VIRTIO_BLK_T_IN, u64::MAX, vec![], 512),
        (VIRTIO_BLK_T_IN, u64::MAX / 512, vec![], 512),
        (VIRTIO_BLK_T_IN, 0, vec![], 100), // not whole sectors
        (VIRTIO_BLK_T_OUT, SECTORS, vec![1u8; 512], 0),
        (VIRTIO_BLK_T_OUT, SECTORS - 1, vec![1u8; 1024], 0),
        (VIRTIO_BLK_T_OUT, u64::MAX, vec![1u8; 512], 0),
    ] {
        let r = request(&mut d, kind, sector, &out, in_len);
        assert_eq!(
            r.status, VIRTIO_BLK_S_IOERR as u8,
            "kind {kind} sector {sector}"
        );
        assert_eq!(r.used_len, 1);
    }
    assert_eq!(file_bytes(&f, 0, (SECTORS * 512) as usize), before);
}

#[test]
fn read_only_disk_refuses_writes() {
    let f = image();
    let mut d = driver(&f, true);
    let r = request(&mut d, VIRTIO_BLK_T_OUT, 0, &[9u8; 512], 0);
    assert_eq!(r.status, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(
        file_bytes(&f, 0, 512),
        (0..512).map(pattern).collect::<Vec<_>>()
    );
    // Flush on a read-only disk is a harmless no-op.
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_FLUSH, 0, &[], 0).status,
        VIRTIO_BLK_S_OK as u8
    );
}

#[test]
fn get_id_and_unsupported_requests() {
    let f = image();
    let mut d = driver(&f, true);
    let r = request(&mut d, VIRTIO_BLK_T_GET_ID, 0, &[], 20);
    assert_eq!(r.status, VIRTIO_BLK_S_OK as u8);
    let name = f.path().file_name().unwrap().to_string_lossy().into_owned();
    let n = name.len().min(20);
    assert_eq!(&r.data[..n], &name.as_bytes()[..n]);
    assert!(
        r.data[n..].iter().all(|&b| b == 0),
        "id is zero-padded to 20 bytes"
    );
    assert_eq!(r.used_len, 21);
    let r = request(&mut d, 11 /* DISCARD, not offered */, 0, &[], 0);
    assert_eq!(r.status, VIRTIO_BLK_S_UNSUPP as u8);
}

#[test]
fn framing_is_not_assumed() {
    // Header split over two descriptors; data and status sharing one descriptor.
    let f = image();
    let mut d = driver(&f, true);
    let hdr = header(&mut d, VIRTIO_BLK_T_IN, 2);
    let data_status = d.alloc(513);
    d.write_mem(data_status + 512, &[0xff]);
    d.add_chain(
        0,
        &[
            Buf::ro(hdr, 5),
            Buf::ro(hdr + 5, 11),
            Buf::wo(data_status, 513),
        ],
    );
    d.kick(0);
    d.wait_used_blocking(0, 1);
    let (_, len) = d.pop_used(0).unwrap();
    assert_eq!(len, 513);
    assert_eq!(d.read_mem(data_status + 512, 1)[0], VIRTIO_BLK_S_OK as u8);
    assert_eq!(
        d.read_mem(data_status, 512),
        (1024..1536).map(pattern).collect::<Vec<_>>()
    );
}

#[test]
fn hostile_chains_do_not_panic_and_the_device_keeps_working() {
    let f = image();
    let mut d = driver(&f, false);
    // 1. No writable descriptor at all: nowhere to put a status.
    let hdr = header(&mut d, VIRTIO_BLK_T_IN, 0);
    d.add_chain(0, &[Buf::ro(hdr, 16)]);
    // 2. Header too short.
    let status = d.alloc(1);
    d.add_chain(0, &[Buf::ro(hdr, 8), Buf::wo(status, 1)]);
    // 3. Data buffer outside guest memory.
    let status2 = d.alloc(1);
    d.add_chain(
        0,
        &[Buf::ro(hdr, 16), Buf::wo(1 << 40, 512), Buf::wo(status2, 1)],
    );
    // 4. Readable after writable.
    d.add_chain(0, &[Buf::ro(hdr, 16), Buf::wo(status, 1), Buf::ro(hdr, 16)]);
    // 5. A descriptor loop: 100 -> 101 -> 100 ...
    d.write_raw_desc(0, 100, hdr, 16, VRING_DESC_F_NEXT as u16, 101);
    d.write_raw_desc(0, 101, status, 1, VRING_DESC_F_NEXT as u16 | 2, 100);
    d.publish_raw_head(0, 100);
    // 6. A head index beyond the queue size.
    d.publish_raw_head(0, 1000);
    d.kick(0);
    d.wait_used_blocking(0, 5);
    let mut lens = vec![];
    while let Some((_, len)) = d.pop_used(0) {
        lens.push(len);
    }
    assert_eq!(lens[0], 0, "no status byte: nothing written");
    assert_eq!(d.read_mem(status, 1)[0], VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(d.read_mem(status2, 1)[0], VIRTIO_BLK_S_IOERR as u8);
    // Still serving, and not asking for a reset over one bad head.
    assert_eq!(d.status() & 64, 0);
    let r = request(&mut d, VIRTIO_BLK_T_IN, 0, &[], 512);
    assert_eq!(r.status, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn batches_requests_into_one_interrupt_and_honours_used_event() {
    let f = image();
    let mut d = driver(&f, true);
    d.take_irqs();
    let mut statuses = vec![];
    for i in 0..16u64 {
        let hdr = header(&mut d, VIRTIO_BLK_T_IN, i);
        let data = d.alloc(512);
        let st = d.alloc(1);
        statuses.push(st);
        d.add_chain(0, &[Buf::ro(hdr, 16), Buf::wo(data, 512), Buf::wo(st, 1)]);
    }
    d.kick(0);
    d.wait_used_blocking(0, 16);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(d.take_irqs(), 1, "one interrupt for the batch");
    assert!(statuses
        .iter()
        .all(|&s| d.read_mem(s, 1)[0] == VIRTIO_BLK_S_OK as u8));
    // The device re-armed notifications: avail_event is the next index it will look at.
    assert_eq!(d.avail_event(0), d.avail_idx(0));
    while d.pop_used(0).is_some() {}

    // The driver says "don't interrupt me until used index 100": no interrupt.
    d.set_used_event(0, 100);
    let hdr = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let data = d.alloc(512);
    let st = d.alloc(1);
    d.add_chain(0, &[Buf::ro(hdr, 16), Buf::wo(data, 512), Buf::wo(st, 1)]);
    d.kick(0);
    d.wait_used_blocking(0, 1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(d.take_irqs(), 0, "used_event suppresses the interrupt");
    assert_eq!(
        d.ack_interrupt() & 1,
        1,
        "status bit from the first batch still pending"
    );
}

#[test]
fn reset_stops_the_worker_and_reinit_works() {
    let f = image();
    let mut d = driver(&f, true);
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_IN, 0, &[], 512).status,
        VIRTIO_BLK_S_OK as u8
    );
    d.write32(reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(d.status(), 0);
    // A request posted on the old rings after reset is not served.
    let hdr = header(&mut d, VIRTIO_BLK_T_IN, 0);
    let st = d.alloc(1);
    d.add_chain(0, &[Buf::ro(hdr, 16), Buf::wo(st, 1)]);
    d.kick(0);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(d.pending_used(0), 0);
    d.init(ALL, &[64]);
    assert_eq!(
        request(&mut d, VIRTIO_BLK_T_IN, 1, &[], 512).status,
        VIRTIO_BLK_S_OK as u8
    );
}

#[test]
fn opening_a_missing_image_is_a_clear_error() {
    let err = BlockDevice::open("/nonexistent/disk.img", true).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
}

/// Deterministic xorshift for the garbage-ring test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The I/O loop run synchronously over rings full of random bytes: descriptors pointing
/// anywhere (often into RAM, sometimes not), random flags, lengths, `next` links, avail
/// indices and request headers. It must return errors or IOERR, never panic.
#[test]
fn garbage_rings_never_panic() {
    use std::sync::Arc;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    let f = image();
    let dev = BlockDevice::open(f.path(), false).unwrap();
    let mem = Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let irq = crate::devices::virtio::IrqTrigger::new(
        Arc::new(std::sync::atomic::AtomicU32::new(0)),
        Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap()),
    );
    let new_queue = || {
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0x1000), None);
        q.set_avail_ring_address(Some(0x2000), None);
        q.set_used_ring_address(Some(0x3000), None);
        q.set_event_idx(true);
        q.set_ready(true);
        q
    };
    let mut io = super::BlockIo {
        file: dev.file.clone(),
        read_only: false,
        capacity_bytes: SECTORS * SECTOR_SIZE,
        id: dev.id,
        mem: mem.clone(),
        queue: new_queue(),
        irq,
        descs: Vec::new(),
        needs_reset: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..3000 {
        for i in 0..16u64 {
            let addr = match rng.next() % 4 {
                0 => rng.next(),
                _ => 0x4000 + rng.next() % 0xf_0000,
            };
            let len = match rng.next() % 3 {
                0 => rng.next() as u32,
                _ => (rng.next() % 2048) as u32,
            };
            let flags = (rng.next() % 8) as u16;
            let next = (rng.next() % 20) as u16;
            let at = GuestAddress(0x1000 + 16 * i);
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
        }
        for i in 0..16u64 {
            mem.write_obj((rng.next() % 20) as u16, GuestAddress(0x2004 + 2 * i))
                .unwrap();
        }
        // Request headers scattered through RAM: type 0..9, any sector.
        for _ in 0..8 {
            let at = GuestAddress(0x4000 + rng.next() % 0xf_0000);
            let _ = mem.write_obj((rng.next() % 10) as u32, at);
            let _ = mem.write_obj(rng.next() % (SECTORS + 4), GuestAddress(at.0 + 8));
        }
        let idx = io.queue.next_avail().wrapping_add((rng.next() % 24) as u16);
        mem.write_obj(idx, GuestAddress(0x2002)).unwrap();
        mem.write_obj(rng.next() as u16, GuestAddress(0x2004 + 32))
            .unwrap();
        match io.process_queue() {
            Ok(()) => ok += 1,
            Err(_) => {
                err += 1;
                io.queue = new_queue();
            }
        }
    }
    assert!(
        ok > 0 && err > 0,
        "both paths exercised ({ok} ok, {err} errors)"
    );
}
