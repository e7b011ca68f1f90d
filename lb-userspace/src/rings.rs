//! Space in the shared ring array, in extents of one ring each (its ring
//! size rounded up to whole array words). A VIP always owns two: its live
//! ring and a spare, where the next ring is written before a single
//! VIP-map update makes it live, so a packet reads the old ring or the new
//! one, never a mix. The rings GUE alternates come from take more extents
//! while there is room, and give them back when a VIP needs them.

/// A run of slots `[offset, offset + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    pub offset: u32,
    pub len: u32,
}

/// First-fit allocator over `[0, capacity)`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RingSpace {
    /// Free extents, sorted by offset, never adjacent (merged on free).
    free: Vec<Extent>,
    #[serde(default)]
    pub capacity: u32,
}

impl RingSpace {
    pub fn new(capacity: u32) -> Self {
        Self { free: vec![Extent { offset: 0, len: capacity }], capacity }
    }

    pub fn alloc(&mut self, len: u32) -> Option<Extent> {
        let i = self.free.iter().position(|e| e.len >= len)?;
        let hole = &mut self.free[i];
        let got = Extent { offset: hole.offset, len };
        hole.offset += len;
        hole.len -= len;
        if hole.len == 0 {
            self.free.remove(i);
        }
        Some(got)
    }

    pub fn free(&mut self, extent: Extent) {
        let i = self.free.partition_point(|e| e.offset < extent.offset);
        self.free.insert(i, extent);
        // Merge with the next, then with the previous neighbour.
        if i + 1 < self.free.len() && self.free[i].offset + self.free[i].len == self.free[i + 1].offset {
            self.free[i].len += self.free[i + 1].len;
            self.free.remove(i + 1);
        }
        if i > 0 && self.free[i - 1].offset + self.free[i - 1].len == self.free[i].offset {
            self.free[i - 1].len += self.free[i].len;
            self.free.remove(i);
        }
    }

    pub fn largest_free(&self) -> u32 {
        self.free.iter().map(|e| e.len).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_merges_back_to_one_extent() {
        let mut space = RingSpace::new(100);
        let a = space.alloc(30).unwrap();
        let b = space.alloc(30).unwrap();
        let c = space.alloc(40).unwrap();
        assert_eq!((a.offset, b.offset, c.offset), (0, 30, 60));
        assert!(space.alloc(1).is_none());
        space.free(b);
        assert!(space.alloc(31).is_none());
        space.free(a);
        assert_eq!(space.largest_free(), 60);
        space.free(c);
        assert_eq!(space.free, vec![Extent { offset: 0, len: 100 }]);
    }
}
