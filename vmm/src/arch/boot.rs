//! Loading the kernel and initrd, and writing what the kernel reads at entry: the command line
//! and either PVH's `hvm_start_info` or Linux's `boot_params`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use super::regs::BootEntry;
use super::{low_ram_end, MemoryMapEntry};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot load kernel {path}: {source}")]
    Kernel {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { path: String, size: u64 },
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("kernel command line longer than {CMDLINE_MAX_SIZE} bytes")]
    CmdlineTooLong,
    #[error("cannot write boot structures: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// What loading the kernel produced.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub entry: BootEntry,
    /// First byte after the kernel image: the initrd must start above it.
    pub end: u64,
    /// The bzImage setup header, which `boot_params` must start from.
    pub setup_header: Option<setup_header>,
}

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Loads an ELF `vmlinux` (entering through PVH if it has the note, else the 64-bit Linux boot
/// protocol) or a `bzImage` (64-bit Linux boot protocol).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let display = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::Open {
        path: display.clone(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC;
    file.seek(SeekFrom::Start(0))
        .map_err(|source| BootError::Open {
            path: display.clone(),
            source,
        })?;
    let kernel_err = |source| BootError::Kernel {
        path: display.clone(),
        source,
    };
    if is_elf {
        for (addr, len) in elf_load_ranges(&mut file).unwrap_or_default() {
            populate(mem, addr, len);
        }
        file.seek(SeekFrom::Start(0))
            .map_err(|source| BootError::Open {
                path: display.clone(),
                source,
            })?;
        let r =
            Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(kernel_err)?;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => BootEntry::Pvh(addr),
            _ => BootEntry::Linux64(r.kernel_load),
        };
        Ok(LoadedKernel {
            entry,
            end: r.kernel_end,
            setup_header: None,
        })
    } else {
        if let Ok(meta) = file.metadata() {
            populate(mem, HIMEM_START, meta.len());
        }
        let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(kernel_err)?;
        Ok(LoadedKernel {
            entry: BootEntry::Linux64(GuestAddress(r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET)),
            end: r.kernel_end,
            setup_header: r.setup_header,
        })
    }
}

/// Copies the initrd to the top of low memory (page aligned, below `addr_max`), straight from
/// the file into guest memory.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<LoadedInitrd, BootError> {
    let display = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::Open {
        path: display.clone(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::Initrd {
            path: display.clone(),
            source,
        })?
        .len();
    let top = low_ram_end(mem).min(addr_max.saturating_add(1));
    let addr = top.checked_sub(size).map(|a| a & !0xfff);
    let Some(addr) = addr.filter(|&a| a >= kernel_end && a >= HIMEM_START) else {
        return Err(BootError::InitrdTooLarge {
            path: display,
            size,
        });
    };
    populate(mem, addr, size);
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::Initrd {
            path: display,
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(LoadedInitrd { addr, size })
}

/// `MADV_POPULATE_WRITE` (Linux 5.14), not yet in the libc crate.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Faults in guest memory for `[addr, addr + len)` with one `madvise` instead of one page fault
/// per page during the copy that follows: on a nested or loaded host each fault is a costly
/// exception round trip, and this is most of the VMM's setup time. Best effort: on failure
/// (older kernels) the copy simply faults as usual.
fn populate(mem: &GuestMemoryMmap, addr: u64, len: u64) {
    use vm_memory::GuestMemoryBackend;
    let Some(host) = mem.get_host_address(GuestAddress(addr)).ok() else {
        return;
    };
    // Stay inside the region that holds `addr`.
    let Some(region) = mem.find_region(GuestAddress(addr)) else {
        return;
    };
    let region_end = vm_memory::GuestMemoryRegion::start_addr(region).0
        + vm_memory::GuestMemoryRegion::len(region);
    let start = host as usize & !0xfff;
    let end = (host as usize + len.min(region_end - addr) as usize + 0xfff) & !0xfff;
    // SAFETY: [start, end) lies inside one guest memory mapping that we own; populating it only
    // allocates zero pages there, it changes no contents.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, MADV_POPULATE_WRITE) };
}

/// The (physical address, memory size) of each PT_LOAD segment of an ELF64 file.
fn elf_load_ranges(file: &mut File) -> std::io::Result<Vec<(u64, u64)>> {
    let mut ehdr = [0u8; 64];
    file.read_exact(&mut ehdr)?;
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(&ehdr, 32), u16_at(&ehdr, 54), u16_at(&ehdr, 56));
    if phentsize < 56 || phnum > 64 {
        return Ok(Vec::new());
    }
    let mut ranges = Vec::new();
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        file.seek(SeekFrom::Start(phoff + i * u64::from(phentsize)))?;
        file.read_exact(&mut ph)?;
        if u32::from_le_bytes(ph[0..4].try_into().unwrap()) == 1 {
            ranges.push((u64_at(&ph, 24), u64_at(&ph, 40)));
        }
    }
    Ok(ranges)
}

/// Writes the command line at [`CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<usize, BootError> {
    let s = cmdline.as_cstring().map_err(BootError::Cmdline)?;
    let bytes = s.as_bytes_with_nul();
    if bytes.len() > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong);
    }
    mem.write_slice(bytes, GuestAddress(CMDLINE_START))?;
    Ok(bytes.len())
}

const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_MODLIST_START: u64 = PVH_INFO_START + 0x40;
const PVH_MEMMAP_START: u64 = PVH_INFO_START + 0x80;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Writes PVH's `hvm_start_info` (version 1), its memory map and, with an initrd, a one-entry
/// module list. The layout is the PVH ABI's (xen/include/public/arch-x86/hvm/start_info.h).
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    map: &[MemoryMapEntry],
    initrd: Option<LoadedInitrd>,
) -> Result<(), BootError> {
    let mut info = [0u8; 56];
    info[0..4].copy_from_slice(&PVH_MAGIC.to_le_bytes());
    info[4..8].copy_from_slice(&1u32.to_le_bytes());
    if let Some(initrd) = initrd {
        info[12..16].copy_from_slice(&1u32.to_le_bytes());
        info[16..24].copy_from_slice(&PVH_MODLIST_START.to_le_bytes());
        let mut module = [0u8; 32];
        module[0..8].copy_from_slice(&initrd.addr.to_le_bytes());
        module[8..16].copy_from_slice(&initrd.size.to_le_bytes());
        mem.write_slice(&module, GuestAddress(PVH_MODLIST_START))?;
    }
    info[24..32].copy_from_slice(&CMDLINE_START.to_le_bytes());
    info[40..48].copy_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info[48..52].copy_from_slice(&(map.len() as u32).to_le_bytes());
    for (i, e) in map.iter().enumerate() {
        let mut entry = [0u8; 24];
        entry[0..8].copy_from_slice(&e.addr.to_le_bytes());
        entry[8..16].copy_from_slice(&e.size.to_le_bytes());
        let kind = if e.ram { E820_RAM } else { E820_RESERVED };
        entry[16..20].copy_from_slice(&kind.to_le_bytes());
        mem.write_slice(&entry, GuestAddress(PVH_MEMMAP_START + i as u64 * 24))?;
    }
    mem.write_slice(&info, GuestAddress(PVH_INFO_START))?;
    Ok(())
}

/// Writes Linux's `boot_params` for the 64-bit boot protocol: the image's setup header (if it
/// was a bzImage) with our loader fields, the e820 map, command line and initrd.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    map: &[MemoryMapEntry],
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff; // undefined loader
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = if e.ram { E820_RAM } else { E820_RESERVED };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

/// The highest address the kernel accepts an initrd at.
pub fn initrd_addr_max(kernel: &LoadedKernel) -> u64 {
    match kernel.setup_header {
        Some(hdr) if hdr.initrd_addr_max != 0 => u64::from(hdr.initrd_addr_max),
        // Boot protocol < 2.03 default, and a safe bound for an ELF entered directly.
        Some(_) => 0x37ff_ffff,
        None => MMIO_GAP_START - 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::memory_map;
    use std::io::Write;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn initrd_goes_to_top_of_memory_page_aligned() {
        let m = mem();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0x5a; 10000]).unwrap();
        let r = load_initrd(&m, f.path(), 0x200_0000, u64::MAX).unwrap();
        assert_eq!(r.size, 10000);
        assert_eq!(r.addr % 4096, 0);
        assert!(r.addr + r.size <= 64 << 20);
        assert!(r.addr + r.size + 4096 > 64 << 20);
        let b: u8 = m.read_obj(GuestAddress(r.addr + 9999)).unwrap();
        assert_eq!(b, 0x5a);
        // Respects the kernel's limit.
        let r = load_initrd(&m, f.path(), 0x100_0000, (32 << 20) - 1).unwrap();
        assert!(r.addr + r.size <= 32 << 20);
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_is_refused() {
        let m = mem();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0; 8 << 20]).unwrap();
        assert!(matches!(
            load_initrd(&m, f.path(), 60 << 20, u64::MAX),
            Err(BootError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn pvh_start_info_layout() {
        let m = mem();
        let map = memory_map(64 << 20);
        let initrd = LoadedInitrd {
            addr: 0x300_0000,
            size: 1234,
        };
        write_pvh_start_info(&m, &map, Some(initrd)).unwrap();
        let magic: u32 = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, PVH_MAGIC);
        let nr_modules: u32 = m.read_obj(GuestAddress(PVH_INFO_START + 12)).unwrap();
        assert_eq!(nr_modules, 1);
        let cmdline: u64 = m.read_obj(GuestAddress(PVH_INFO_START + 24)).unwrap();
        assert_eq!(cmdline, CMDLINE_START);
        let entries: u32 = m.read_obj(GuestAddress(PVH_INFO_START + 48)).unwrap();
        assert_eq!(entries as usize, map.len());
        let mod_addr: u64 = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!(mod_addr, 0x300_0000);
        let second_size: u64 = m.read_obj(GuestAddress(PVH_MEMMAP_START + 24 + 8)).unwrap();
        assert_eq!(second_size, (64 << 20) - HIMEM_START);
    }

    #[test]
    fn boot_params_carry_e820_cmdline_and_initrd() {
        let m = mem();
        let map = memory_map(64 << 20);
        let kernel = LoadedKernel {
            entry: BootEntry::Linux64(GuestAddress(0x100_0200)),
            end: 0x200_0000,
            setup_header: None,
        };
        let initrd = LoadedInitrd {
            addr: 0x300_0000,
            size: 99,
        };
        write_boot_params(&m, &kernel, &map, 42, Some(initrd)).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(p.e820_entries, 2);
        let e1 = p.e820_table[1];
        assert_eq!((e1.addr, e1.r#type), (HIMEM_START, 1));
        let (ptr, size, img, rsize, flag) = (
            p.hdr.cmd_line_ptr,
            p.hdr.cmdline_size,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
            p.hdr.boot_flag,
        );
        assert_eq!((ptr, size), (CMDLINE_START as u32, 42));
        assert_eq!((img, rsize), (0x300_0000, 99));
        assert_eq!(flag, 0xaa55);
    }

    #[test]
    fn garbage_kernel_is_a_clear_error() {
        let m = mem();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"this is not a kernel").unwrap();
        let err = load_kernel(&m, f.path()).unwrap_err();
        assert!(matches!(err, BootError::Kernel { .. }), "{err}");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"\x7fELF garbage").unwrap();
        assert!(load_kernel(&m, f.path()).is_err());
        assert!(matches!(
            load_kernel(&m, Path::new("/nonexistent/vmlinux")),
            Err(BootError::Open { .. })
        ));
    }

    #[test]
    fn cmdline_is_nul_terminated() {
        let m = mem();
        let mut c = Cmdline::new(CMDLINE_MAX_SIZE).unwrap();
        c.insert_str("console=ttyS0 quiet").unwrap();
        let n = write_cmdline(&m, &c).unwrap();
        assert_eq!(n, 20);
        let mut b = [0u8; 20];
        m.read_slice(&mut b, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&b, b"console=ttyS0 quiet\0");
    }
}
