//! The in-kernel GICv3 (`KVM_DEV_TYPE_ARM_VGIC_V3`) and raising its SPIs.
//!
//! KVM emulates the distributor and redistributors at the addresses given here and the CPU
//! interface in the vCPUs' system registers; the VMM only configures it and raises SPIs, either
//! with `KVM_IRQ_LINE` ([`set_spi`]) or through an irqfd on GSI [`irqfd_gsi`] (KVM's default arm64
//! routing maps GSI *n* to SPI *n*).

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
    KVM_ARM_IRQ_TYPE_SHIFT, KVM_ARM_IRQ_TYPE_SPI, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{DeviceFd, VmFd};

use super::KvmArm64Error;
use crate::arch::aarch64::layout::{self, LayoutError};

/// A created and initialised vGICv3.
#[derive(Debug)]
pub struct Vgic {
    fd: DeviceFd,
    vcpus: u32,
}

impl Vgic {
    /// Creates the vGIC for `vcpus` vCPUs at the layout's addresses with
    /// [`layout::GIC_NR_IRQS`] interrupts, and initialises it. Every vCPU must already exist
    /// and be initialised (KVM sizes the redistributors from them), and none may have run.
    pub fn create(vm: &VmFd, vcpus: u32) -> Result<Self, VgicCreateError> {
        let redist = layout::gic_redist(vcpus)?;
        let mut device = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
            fd: 0,
            flags: 0,
        };
        let fd = vm
            .create_device(&mut device)
            .map_err(KvmArm64Error::call("KVM_CREATE_DEVICE(VGIC_V3)"))?;
        let vgic = Vgic { fd, vcpus };
        vgic.set::<u64>(
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            KVM_VGIC_V3_ADDR_TYPE_DIST.into(),
            layout::GIC_DIST.base,
        )?;
        vgic.set::<u64>(
            KVM_DEV_ARM_VGIC_GRP_ADDR,
            KVM_VGIC_V3_ADDR_TYPE_REDIST.into(),
            redist.base,
        )?;
        vgic.set::<u32>(KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, layout::GIC_NR_IRQS)?;
        let init = kvm_device_attr {
            group: KVM_DEV_ARM_VGIC_GRP_CTRL,
            attr: KVM_DEV_ARM_VGIC_CTRL_INIT.into(),
            addr: 0,
            flags: 0,
        };
        vgic.fd
            .set_device_attr(&init)
            .map_err(attr_err("KVM_SET_DEVICE_ATTR", &init))?;
        Ok(vgic)
    }

    /// The number of vCPUs it serves.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Reads an attribute: `u32` for the distributor, redistributor and level groups, `u64`
    /// for the CPU interface system registers (what KVM writes for each group).
    pub fn get<T: AttrValue>(&self, group: u32, attr: u64) -> Result<T, KvmArm64Error> {
        let mut value = T::default();
        let mut request = attr_request(group, attr, &mut value);
        // SAFETY: `addr` points at `value`, live for the call; it is as wide as what KVM writes
        // for `group` (the `AttrValue` types are exactly u32 and u64, chosen per group).
        unsafe { self.fd.get_device_attr(&mut request) }
            .map_err(attr_err("KVM_GET_DEVICE_ATTR", &request))?;
        Ok(value)
    }

    /// Writes an attribute (widths as for [`get`](Self::get)).
    pub fn set<T: AttrValue>(
        &self,
        group: u32,
        attr: u64,
        mut value: T,
    ) -> Result<(), KvmArm64Error> {
        let request = attr_request(group, attr, &mut value);
        self.fd
            .set_device_attr(&request)
            .map_err(attr_err("KVM_SET_DEVICE_ATTR", &request))
    }
}

/// The value of a vGIC attribute: 32 or 64 bits.
pub trait AttrValue: Copy + Default + sealed::Sealed {}
impl AttrValue for u32 {}
impl AttrValue for u64 {}

mod sealed {
    /// Only the widths KVM uses.
    pub trait Sealed {}
    impl Sealed for u32 {}
    impl Sealed for u64 {}
}

fn attr_request<T>(group: u32, attr: u64, value: &mut T) -> kvm_device_attr {
    kvm_device_attr {
        group,
        attr,
        addr: value as *mut T as u64,
        flags: 0,
    }
}

fn attr_err(
    op: &'static str,
    request: &kvm_device_attr,
) -> impl FnOnce(kvm_ioctls::Error) -> KvmArm64Error {
    let (group, attr) = (request.group, request.attr);
    move |e| KvmArm64Error::VgicAttr {
        op,
        group,
        attr,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// The vGIC could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VgicCreateError {
    /// The vCPU count does not fit the layout's redistributor window.
    #[error("the vGIC cannot serve this many vCPUs")]
    Layout(#[from] LayoutError),
    /// KVM refused (no GICv3 on the host: `KVM_CREATE_DEVICE` fails with ENODEV).
    #[error("creating the in-kernel GICv3 failed")]
    Kvm(#[from] KvmArm64Error),
}

/// The `KVM_IRQ_LINE` number of SPI `spi`: interrupt type SPI, and the GIC INTID.
pub fn spi_irq_line(spi: u32) -> u32 {
    (KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT) | (layout::SPI_INTID_BASE + spi)
}

/// Drives SPI `spi`'s input line (`true`: asserted). An edge-triggered SPI becomes pending on
/// the rising edge.
pub fn set_spi(vm: &VmFd, spi: u32, level: bool) -> Result<(), KvmArm64Error> {
    vm.set_irq_line(spi_irq_line(spi), level)
        .map_err(KvmArm64Error::call("KVM_IRQ_LINE"))
}

/// The GSI to register an irqfd on so that signalling it raises SPI `spi` (an edge).
pub fn irqfd_gsi(spi: u32) -> u32 {
    spi
}
