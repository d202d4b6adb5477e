//! Config-space reads as the transports issue them.

/// The `size` bytes of `config` from `offset`, exactly: a frontend rejects a shorter reply, so
/// bytes past the structure read as zero, like reserved fields.
pub fn read_config(config: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let start = (offset as usize).min(config.len());
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(config.len());
    let mut reply = config[start..end].to_vec();
    reply.resize(size as usize, 0);
    reply
}

#[cfg(test)]
mod tests {
    use super::read_config;

    #[test]
    fn reads_are_exact_and_zero_padded() {
        let config = [1, 2, 3, 4];
        assert_eq!(read_config(&config, 1, 2), vec![2, 3]);
        assert_eq!(read_config(&config, 2, 4), vec![3, 4, 0, 0]);
        assert_eq!(read_config(&config, 100, 3), vec![0; 3]);
        assert_eq!(read_config(&config, u32::MAX, 2), vec![0; 2]);
        assert!(read_config(&[], 0, 0).is_empty());
    }
}
