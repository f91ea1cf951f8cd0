//! Placeholder until the checkpoint branch lands (same API).
use crate::block::BlockIndex;

#[derive(Debug, Clone)]
pub struct SettledSet {
    bits: Vec<bool>,
    cursor: u64,
    count: u64,
}

impl SettledSet {
    pub fn new(block_count: u64) -> Self {
        Self { bits: vec![false; block_count as usize], cursor: 0, count: 0 }
    }
    pub fn settle(&mut self, index: BlockIndex) {
        if !self.bits[index as usize] {
            self.bits[index as usize] = true;
            self.count += 1;
        }
        while (self.cursor as usize) < self.bits.len() && self.bits[self.cursor as usize] {
            self.cursor += 1;
        }
    }
    pub fn is_settled(&self, index: BlockIndex) -> bool {
        self.bits[index as usize]
    }
    pub fn cursor(&self) -> BlockIndex {
        self.cursor
    }
    pub fn settled_count(&self) -> u64 {
        self.count
    }
}
