//! The vhost-user messages that set the daemon up: what to send, computed from the guest memory
//! and the driver's queues, apart from the socket so it can be tested without a daemon.

use std::os::fd::AsRawFd;

use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::eventfd::EventFd;

/// Why the daemon could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("guest memory region at {0:#x} is not backed by a file the daemon can map")]
    MemoryNotShared(u64),
    #[error("guest memory region at {0:#x}: {1}")]
    Memory(u64, vm_memory::guest_memory::Error),
    #[error("queue {queue}: ring address {addr:#x} is outside guest memory")]
    Ring { queue: usize, addr: u64 },
    #[error("vhost-user: {0}")]
    VhostUser(#[from] vhost::Error),
}

/// The memory table for `SET_MEM_TABLE`: one entry per guest memory region, with the memfd and
/// the region's offset in it, and the VMM's own address of the region (vhost-user ring addresses
/// are the frontend's virtual addresses).
pub fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, SetupError> {
    mem.iter()
        .map(|region| {
            let start = region.start_addr().raw_value();
            let file = region
                .file_offset()
                .ok_or(SetupError::MemoryNotShared(start))?;
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| SetupError::Memory(start, e))?;
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: start,
                memory_size: region.len(),
                userspace_addr: host as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            })
        })
        .collect()
}

/// A queue's `SET_VRING_ADDR` payload: its rings as VMM virtual addresses.
pub fn vring_config(
    mem: &GuestMemoryMmap,
    index: usize,
    queue: &Queue,
) -> Result<VringConfigData, SetupError> {
    let host = |addr: u64| {
        mem.get_host_address(GuestAddress(addr))
            .map(|p| p as u64)
            .map_err(|_| SetupError::Ring { queue: index, addr })
    };
    Ok(VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: host(queue.desc_table())?,
        used_ring_addr: host(queue.used_ring())?,
        avail_ring_addr: host(queue.avail_ring())?,
        log_addr: None,
    })
}

/// Hands the daemon the memory and the queues, and starts them (the vhost-user order: features,
/// memory table, then per queue size, addresses, base, call, kick, and enable when protocol
/// features were negotiated, as rings then start disabled).
pub fn start(
    frontend: &mut Frontend,
    features: u64,
    protocol: Option<VhostUserProtocolFeatures>,
    mem: &GuestMemoryMmap,
    queues: &[Queue],
    kicks: &[EventFd],
    calls: &[EventFd],
) -> Result<(), SetupError> {
    frontend.set_features(features)?;
    frontend.set_mem_table(&memory_table(mem)?)?;
    for (i, q) in queues.iter().enumerate() {
        frontend.set_vring_num(i, q.size())?;
        frontend.set_vring_addr(i, &vring_config(mem, i, q)?)?;
        frontend.set_vring_base(i, q.next_avail())?;
        frontend.set_vring_call(i, &calls[i])?;
        frontend.set_vring_kick(i, &kicks[i])?;
    }
    if protocol.is_some() {
        for i in 0..queues.len() {
            frontend.set_vring_enable(i, true)?;
        }
    }
    Ok(())
}

/// Stops the daemon's queues (`GET_VRING_BASE` stops a ring), for a device reset.
pub fn stop(frontend: &mut Frontend, queues: usize) -> Result<(), SetupError> {
    for i in 0..queues {
        frontend.get_vring_base(i)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::FileOffset;

    use super::*;

    fn shared_memory() -> GuestMemoryMmap {
        let file = Arc::new(tempfile::tempfile().unwrap());
        file.set_len(0x30000).unwrap();
        GuestMemoryMmap::from_ranges_with_files([
            (
                GuestAddress(0),
                0x10000,
                Some(FileOffset::from_arc(file.clone(), 0)),
            ),
            (
                GuestAddress(0x100000),
                0x20000,
                Some(FileOffset::from_arc(file, 0x10000)),
            ),
        ])
        .unwrap()
    }

    #[test]
    fn memory_table_maps_each_region_at_its_file_offset() {
        let mem = shared_memory();
        let table = memory_table(&mem).unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(
            (
                table[1].guest_phys_addr,
                table[1].memory_size,
                table[1].mmap_offset
            ),
            (0x100000, 0x20000, 0x10000)
        );
        assert_eq!(table[0].mmap_handle, table[1].mmap_handle, "one memfd");
        let host = mem.get_host_address(GuestAddress(0x100000)).unwrap() as u64;
        assert_eq!(table[1].userspace_addr, host);
    }

    #[test]
    fn anonymous_memory_cannot_be_handed_to_a_daemon() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        assert!(matches!(
            memory_table(&mem),
            Err(SetupError::MemoryNotShared(0))
        ));
    }

    #[test]
    fn vring_addresses_are_vmm_addresses_of_the_driver_rings() {
        let mem = shared_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        let q = vq.create_queue::<Queue>().unwrap();
        let c = vring_config(&mem, 1, &q).unwrap();
        let hva = |a: u64| mem.get_host_address(GuestAddress(a)).unwrap() as u64;
        assert_eq!(c.queue_size, 16);
        assert_eq!(c.desc_table_addr, hva(q.desc_table()));
        assert_eq!(c.avail_ring_addr, hva(q.avail_ring()));
        assert_eq!(c.used_ring_addr, hva(q.used_ring()));
    }
}
