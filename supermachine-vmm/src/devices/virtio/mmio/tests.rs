//! Transport tests: a probe device behind [`MmioTransport`], driven like Linux's driver.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueState};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::super::test_driver::{GuestDriver, MEM_SIZE};
use super::super::{
    ActivateError, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_VRING,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::bus::BusDevice;

const PROBE_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | (1 << 3);

#[derive(Default)]
struct ProbeState {
    acked: Option<u64>,
    activations: Vec<Vec<QueueState>>,
    irq: Option<IrqTrigger>,
    notify: Vec<EventFd>,
    resets: u32,
    config: [u8; 12],
}

/// Records everything the transport tells it.
struct Probe {
    state: Arc<Mutex<ProbeState>>,
    sizes: Vec<u16>,
}

impl VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        PROBE_FEATURES
    }
    fn ack_features(&mut self, features: u64) {
        self.state.lock().unwrap().acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let st = self.state.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = st.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut st = self.state.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = st.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(
        &mut self,
        _mem: Arc<GuestMemoryMmap<()>>,
        queues: Vec<Queue>,
        irq: IrqTrigger,
        notify: Vec<EventFd>,
    ) -> Result<(), ActivateError> {
        let mut st = self.state.lock().unwrap();
        st.activations
            .push(queues.iter().map(|q| q.state()).collect());
        st.irq = Some(irq);
        st.notify = notify;
        Ok(())
    }
    fn reset(&mut self) {
        let mut st = self.state.lock().unwrap();
        st.resets += 1;
        st.irq = None;
        st.notify.clear();
    }
}

fn probe_driver() -> (GuestDriver, Arc<Mutex<ProbeState>>) {
    let state = Arc::new(Mutex::new(ProbeState::default()));
    let dev = Probe {
        state: state.clone(),
        sizes: vec![256, 16],
    };
    (GuestDriver::new(Box::new(dev)), state)
}

#[test]
fn identifies_as_modern_virtio_mmio() {
    let (mut d, _) = probe_driver();
    assert_eq!(d.read32(reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_DEVICE_ID), 42);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_VENDOR_ID), super::MMIO_VENDOR_ID);
    assert_eq!(d.device_features(), PROBE_FEATURES);
    d.write32(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_DEVICE_FEATURES), 0);
    assert_eq!(
        d.read32(reg::VIRTIO_MMIO_SHM_LEN_LOW),
        u32::MAX,
        "no shm regions"
    );
    // Queue sizes per selected queue; a queue that does not exist has max 0.
    for (sel, max) in [(0, 256), (1, 16), (2, 0), (u32::MAX, 0)] {
        d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, sel);
        assert_eq!(d.read32(reg::VIRTIO_MMIO_QUEUE_NUM_MAX), max);
    }
}

#[test]
fn negotiates_features_and_activates_with_queue_config() {
    let (mut d, st) = probe_driver();
    let got = d.init(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, &[128, 16]);
    assert_eq!(got, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    let s = st.lock().unwrap();
    assert_eq!(s.acked, Some(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX));
    assert_eq!(s.activations.len(), 1);
    let qs = &s.activations[0];
    assert_eq!(qs.len(), 2);
    assert_eq!(qs[0].size, 128);
    assert_eq!(qs[1].size, 16);
    assert!(qs.iter().all(|q| q.ready && q.event_idx_enabled));
    assert_eq!(qs[0].desc_table, d.queues[0].desc);
    assert_eq!(qs[0].avail_ring, d.queues[0].avail);
    assert_eq!(qs[0].used_ring, d.queues[0].used);
    drop(s);
    assert!(d.transport.is_activated());
    assert_eq!(
        d.status(),
        VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
    );
    // Registers still read back after activation (Linux checks QueueReady on teardown).
    d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_QUEUE_READY), 1);
    assert_eq!(
        d.read32(reg::VIRTIO_MMIO_QUEUE_DESC_LOW) as u64,
        d.queues[1].desc
    );
}

#[test]
fn event_idx_is_off_unless_negotiated() {
    let (mut d, st) = probe_driver();
    d.init(VIRTIO_F_VERSION_1, &[64, 16]);
    let s = st.lock().unwrap();
    assert!(s.activations[0].iter().all(|q| !q.event_idx_enabled));
}

#[test]
fn refuses_features_not_offered_and_legacy_drivers() {
    // A feature the device never offered: FEATURES_OK does not stick.
    let (mut d, st) = probe_driver();
    d.write32(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    d.write32(
        reg::VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    d.write_driver_features(VIRTIO_F_VERSION_1 | (1 << 7));
    d.write32(
        reg::VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(d.status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    assert_eq!(st.lock().unwrap().acked, None);

    // No VERSION_1 (a legacy driver): refused too.
    let (mut d, st) = probe_driver();
    assert!(!d.negotiate(VIRTIO_RING_F_EVENT_IDX));
    assert_eq!(st.lock().unwrap().acked, None);
    // DRIVER_OK without FEATURES_OK does nothing.
    d.driver_ok();
    assert_eq!(d.status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    assert!(st.lock().unwrap().activations.is_empty());

    // Feature bits in a selector word past 1 are never acceptable.
    let (mut d, _) = probe_driver();
    d.write32(
        reg::VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    d.write_driver_features(VIRTIO_F_VERSION_1);
    d.write32(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
    d.write32(reg::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    d.write32(
        reg::VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
    );
    assert_eq!(d.status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
}

#[test]
fn status_bits_out_of_order_or_cleared_are_ignored() {
    let (mut d, st) = probe_driver();
    // DRIVER before ACKNOWLEDGE.
    d.write32(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
    assert_eq!(d.status(), 0);
    // Skipping ahead to DRIVER_OK in one write.
    d.write32(
        reg::VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_eq!(d.status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    assert!(st.lock().unwrap().activations.is_empty());
    d.write32(reg::VIRTIO_MMIO_STATUS, 0);
    d.write32(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    d.write32(
        reg::VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
    );
    // Clearing a bit without reset is ignored.
    d.write32(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
    assert_eq!(
        d.status(),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    );
}

#[test]
fn reset_returns_to_initial_state_and_device_can_be_reinitialised() {
    let (mut d, st) = probe_driver();
    d.init(VIRTIO_F_VERSION_1, &[256, 16]);
    st.lock()
        .unwrap()
        .irq
        .clone()
        .unwrap()
        .trigger(VIRTIO_MMIO_INT_VRING)
        .unwrap();
    assert_eq!(
        d.read32(reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_VRING
    );

    d.write32(reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(d.status(), 0);
    assert_eq!(st.lock().unwrap().resets, 1);
    assert!(!d.transport.is_activated());
    assert_eq!(d.read32(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    for sel in 0..2 {
        d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, sel);
        assert_eq!(d.read32(reg::VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(d.read32(reg::VIRTIO_MMIO_QUEUE_DESC_LOW), 0);
    }
    // Queue notifies after reset go nowhere (and do not panic).
    d.kick(0);

    d.init(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, &[32, 8]);
    let s = st.lock().unwrap();
    assert_eq!(s.activations.len(), 2);
    assert_eq!(s.activations[1][0].size, 32);
    assert_eq!(s.activations[1][0].next_avail, 0);
}

#[test]
fn queue_notify_write_signals_the_queue_eventfd() {
    let (mut d, st) = probe_driver();
    // Before DRIVER_OK a notify is ignored.
    d.kick(0);
    d.init(VIRTIO_F_VERSION_1, &[256, 16]);
    d.kick(1);
    d.kick(1);
    d.kick(7); // no such queue: ignored
    let s = st.lock().unwrap();
    assert_eq!(s.notify.len(), 2);
    assert_eq!(s.notify[1].read().unwrap(), 2);
    assert!(s.notify[0].read().is_err(), "queue 0 was never kicked");
}

#[test]
fn interrupt_status_is_shared_with_the_trigger_and_acked_by_bits() {
    let (mut d, st) = probe_driver();
    d.init(VIRTIO_F_VERSION_1, &[256, 16]);
    let irq = st.lock().unwrap().irq.clone().unwrap();
    irq.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
    irq.trigger(super::VIRTIO_MMIO_INT_CONFIG).unwrap();
    assert_eq!(d.take_irqs(), 2);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 3);
    d.write32(reg::VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 2);
    assert_eq!(d.ack_interrupt(), 2);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn config_space_passes_through_at_any_width() {
    let (mut d, st) = probe_driver();
    st.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
    assert_eq!(d.read_config(0, 8), vec![1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(d.read_config(5, 1), vec![6]);
    assert_eq!(d.read_config(10, 4), vec![11, 12, 0, 0]);
    d.transport.write(0x100 + 2, &[0xaa, 0xbb]);
    assert_eq!(d.read_config(0, 4), vec![1, 2, 0xaa, 0xbb]);
}

/// Sets up queue 0 by hand with `tweak` applied, then tries DRIVER_OK.
fn bring_up_with(tweak: impl FnOnce(&mut GuestDriver)) -> (GuestDriver, Arc<Mutex<ProbeState>>) {
    let (mut d, st) = probe_driver();
    assert!(d.negotiate(VIRTIO_F_VERSION_1));
    assert!(d.setup_queue(0, 64));
    assert!(d.setup_queue(1, 16));
    d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    // Linux would never touch a ready queue; un-ready it so the tweak's writes are accepted.
    d.write32(reg::VIRTIO_MMIO_QUEUE_READY, 0);
    tweak(&mut d);
    d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    if d.read32(reg::VIRTIO_MMIO_QUEUE_READY) == 0 {
        d.write32(reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }
    d.driver_ok();
    (d, st)
}

fn assert_refused(d: &mut GuestDriver, st: &Arc<Mutex<ProbeState>>, what: &str) {
    let s = d.status();
    assert_eq!(
        s & VIRTIO_CONFIG_S_DRIVER_OK,
        0,
        "{what}: DRIVER_OK accepted"
    );
    assert_ne!(
        s & VIRTIO_CONFIG_S_NEEDS_RESET,
        0,
        "{what}: NEEDS_RESET not set"
    );
    assert!(
        st.lock().unwrap().activations.is_empty(),
        "{what}: device activated"
    );
    assert_eq!(d.take_irqs(), 1, "{what}: config-change interrupt expected");
    // The driver recovers with a reset and a proper bring-up.
    d.init(VIRTIO_F_VERSION_1, &[64, 16]);
    assert_eq!(
        st.lock().unwrap().activations.len(),
        1,
        "{what}: recovery failed"
    );
}

#[test]
fn bad_queue_configs_need_reset_instead_of_panicking() {
    type Tweak = Box<dyn FnOnce(&mut GuestDriver)>;
    let cases: Vec<(&str, Tweak)> = vec![
        (
            "size not a power of two",
            Box::new(|d| d.write32(reg::VIRTIO_MMIO_QUEUE_NUM, 100)),
        ),
        (
            "size zero",
            Box::new(|d| d.write32(reg::VIRTIO_MMIO_QUEUE_NUM, 0)),
        ),
        (
            "size above max",
            Box::new(|d| d.write32(reg::VIRTIO_MMIO_QUEUE_NUM, 512)),
        ),
        (
            "size above u16",
            Box::new(|d| d.write32(reg::VIRTIO_MMIO_QUEUE_NUM, 0x1_0040)),
        ),
        (
            "misaligned descriptor table",
            Box::new(|d| d.write32(reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10_0008)),
        ),
        (
            "misaligned used ring",
            Box::new(|d| d.write32(reg::VIRTIO_MMIO_QUEUE_USED_LOW, 0x10_0802)),
        ),
        (
            "rings beyond guest RAM",
            Box::new(|d| {
                d.write_queue_addrs(MEM_SIZE - 0x100, MEM_SIZE + 0x1000, MEM_SIZE + 0x2000)
            }),
        ),
        (
            "rings at the top of the address space",
            Box::new(|d| d.write_queue_addrs(!0xf, !0x1, !0x3)),
        ),
    ];
    for (what, tweak) in cases {
        let (mut d, st) = bring_up_with(tweak);
        assert_refused(&mut d, &st, what);
    }
}

#[test]
fn queue_not_ready_at_driver_ok_needs_reset() {
    let (mut d, st) = probe_driver();
    assert!(d.negotiate(VIRTIO_F_VERSION_1));
    assert!(d.setup_queue(0, 64));
    // Queue 1 is never set up.
    d.driver_ok();
    assert_refused(&mut d, &st, "queue 1 not ready");
}

#[test]
fn queue_registers_are_read_only_outside_setup() {
    let (mut d, st) = probe_driver();
    // Before FEATURES_OK: ignored.
    d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    d.write32(reg::VIRTIO_MMIO_QUEUE_NUM, 8);
    d.write32(reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_QUEUE_DESC_LOW), 0);
    d.init(VIRTIO_F_VERSION_1, &[64, 16]);
    // After DRIVER_OK: ignored, and the running device's copy is untouched anyway.
    let desc = d.queues[0].desc;
    d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    d.write32(reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x2000);
    d.write32(reg::VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(u64::from(d.read32(reg::VIRTIO_MMIO_QUEUE_DESC_LOW)), desc);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_QUEUE_READY), 1);
    // Writes to a queue index that does not exist.
    d.write32(reg::VIRTIO_MMIO_QUEUE_SEL, 9);
    d.write32(reg::VIRTIO_MMIO_QUEUE_NUM, 8);
    assert_eq!(st.lock().unwrap().activations.len(), 1);
}

#[test]
fn odd_width_and_misaligned_register_accesses_do_not_panic() {
    let (mut d, st) = probe_driver();
    let mut b1 = [0xffu8; 1];
    d.transport.read(0, &mut b1);
    assert_eq!(b1, [0]);
    let mut b8 = [0xffu8; 8];
    d.transport.read(0, &mut b8);
    assert_eq!(b8, [0; 8]);
    let mut b4 = [0xffu8; 4];
    d.transport.read(2, &mut b4);
    assert_eq!(b4, [0; 4]);
    d.transport.write(u64::from(reg::VIRTIO_MMIO_STATUS), &[1]);
    d.transport
        .write(u64::from(reg::VIRTIO_MMIO_STATUS) + 1, &[1, 0, 0, 0]);
    d.transport.write(u64::from(reg::VIRTIO_MMIO_STATUS), &[]);
    assert_eq!(d.status(), 0);
    // Unknown and read-only registers.
    d.write32(0x0f0, 5);
    d.write32(reg::VIRTIO_MMIO_MAGIC_VALUE, 0);
    assert_eq!(d.read32(0x0f0), 0);
    assert_eq!(d.read32(reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    // Config space at the far end of the window.
    let mut tail = [0xffu8; 4];
    d.transport.read(0xffc, &mut tail);
    assert_eq!(tail, [0; 4]);
    d.transport.write(0xffc, &[1, 2, 3, 4]);
    assert!(st.lock().unwrap().activations.is_empty());
}

#[test]
fn missing_notify_fds_are_filled_in() {
    let state = Arc::new(Mutex::new(ProbeState::default()));
    let dev = Probe {
        state: state.clone(),
        sizes: vec![16, 16],
    };
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap(),
    );
    let slot = super::super::MmioSlot {
        base: 0xd000_0000,
        irq_line: 5,
        irq: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        notify: vec![],
    };
    let t = super::MmioTransport::new(Box::new(dev), mem, slot).unwrap();
    assert_eq!(t.notify.len(), 2);
    // A device with an impossible queue size is refused at construction.
    let dev = Probe {
        state,
        sizes: vec![100],
    };
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap(),
    );
    let slot = super::super::MmioSlot {
        base: 0,
        irq_line: 5,
        irq: Arc::new(EventFd::new(0).unwrap()),
        notify: vec![],
    };
    assert!(super::MmioTransport::new(Box::new(dev), mem, slot).is_err());
}
