//! The VM generation register: 16 bytes at [`VM_GENERATION_ADDR`] that read as zero after a cold
//! boot and as a fresh random value after every restore or fork. A guest that polls it learns it
//! was cloned, and reseeds its entropy and fixes its clock (VMGenID's job, without ACPI).

use super::bus::{BusDevice, VmExitRequest};
use crate::arch::layout::BOOT_TIMER_ADDR;

pub const VM_GENERATION_ADDR: u64 = BOOT_TIMER_ADDR + 0x10;
pub const VM_GENERATION_LEN: u64 = 0x10;

pub struct VmGeneration {
    id: [u8; 16],
}

impl VmGeneration {
    pub fn cold_boot() -> Self {
        VmGeneration { id: [0; 16] }
    }

    /// A new random generation for a restored VM.
    pub fn fresh() -> Self {
        let mut id = [0u8; 16];
        // getrandom never fails for 16 bytes once the pool is initialised; a zero id would only
        // make this restore look like a cold boot, so the result is checked, not trusted.
        // SAFETY: getrandom writes at most `id.len()` bytes into our buffer.
        let n = unsafe { libc::getrandom(id.as_mut_ptr().cast(), id.len(), 0) };
        if n != id.len() as isize || id == [0; 16] {
            id[0] = 1;
        }
        VmGeneration { id }
    }

    pub fn id(&self) -> u128 {
        u128::from_le_bytes(self.id)
    }
}

impl BusDevice for VmGeneration {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.id.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) -> Option<VmExitRequest> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cold_boot_reads_zero_and_restores_differ() {
        let mut g = VmGeneration::cold_boot();
        let mut word = [0xffu8; 8];
        g.read(8, &mut word);
        assert_eq!(word, [0; 8]);
        let (a, b) = (VmGeneration::fresh(), VmGeneration::fresh());
        assert_ne!(a.id(), 0);
        assert_ne!(a.id(), b.id());
        let mut f = VmGeneration::fresh();
        let (mut lo, mut hi) = ([0u8; 8], [0u8; 8]);
        f.read(0, &mut lo);
        f.read(8, &mut hi);
        assert_eq!(
            u128::from(u64::from_le_bytes(lo)) | (u128::from(u64::from_le_bytes(hi)) << 64),
            f.id()
        );
    }
}
