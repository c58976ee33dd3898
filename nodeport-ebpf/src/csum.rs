//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')) for XDP,
//! where there is no skb and no checksum helper. Words are taken in memory order throughout, so
//! no byte swapping is needed: one's-complement sums commute with a consistent byte order.
//! (The TC programs use the kernel's csum helpers instead, which also handle CHECKSUM_PARTIAL.)

/// Accumulated difference of replaced 16-bit words: sum of ~old + new.
#[derive(Copy, Clone, Default)]
pub struct Delta(u32);

impl Delta {
    #[inline(always)]
    pub fn word(mut self, old: u16, new: u16) -> Self {
        self.0 += u32::from(!old) + u32::from(new);
        self
    }

    #[inline(always)]
    pub fn dword(self, old: u32, new: u32) -> Self {
        self.word(old as u16, new as u16)
            .word((old >> 16) as u16, (new >> 16) as u16)
    }

    #[inline(always)]
    pub fn plus(self, other: Delta) -> Self {
        Delta(self.0 + other.0)
    }

    /// The checksum field after applying this difference to `check`.
    #[inline(always)]
    pub fn apply(self, check: u16) -> u16 {
        let mut sum = u32::from(!check) + self.0;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !(sum as u16)
    }
}
