//! Validated settings of a network device, whichever transport or front end produced them.

use std::fmt;
use std::str::FromStr;

pub const DEFAULT_QUEUE_SIZE: u16 = 256;
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// One worker thread and one TAP queue per pair; Linux caps a TAP at 256 queues, we keep the
/// thread count modest.
pub const MAX_QUEUE_PAIRS: u16 = 8;
/// `IFNAMSIZ` minus the terminating NUL.
pub const MAX_TAP_NAME_LEN: usize = 15;

/// An Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// A locally administered unicast address derived from the TAP name, so that several
    /// devices started without `--mac` still differ and keep their address across restarts.
    pub fn derived_from(tap: &str) -> Self {
        // FNV-1a: stable across builds, unlike std's hasher.
        let hash = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        let [a, b, c, ..] = hash.to_le_bytes();
        MacAddress([0x52, 0x54, 0x00, a, b, c])
    }

    fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a MAC address (six hex bytes separated by ':')")]
pub struct ParseMacError(String);

impl FromStr for MacAddress {
    type Err = ParseMacError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bytes: Vec<u8> = text
            .split(':')
            .map(|part| match part.len() {
                1 | 2 => u8::from_str_radix(part, 16).ok(),
                _ => None,
            })
            .collect::<Option<_>>()
            .ok_or_else(|| ParseMacError(text.to_owned()))?;
        let bytes: [u8; 6] = bytes
            .try_into()
            .map_err(|_| ParseMacError(text.to_owned()))?;
        Ok(MacAddress(bytes))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// TAP interface to attach to.
    pub tap: String,
    /// Create the TAP when no interface of that name exists (it then disappears when the
    /// device closes it). Without it a missing TAP is an error, as in hvisor-tool.
    pub create_tap: bool,
    /// Address in config space; `None` derives one from the TAP name.
    pub mac: Option<MacAddress>,
    /// RX/TX queue pairs, one worker thread and one TAP queue each; more than one offers MQ.
    pub queue_pairs: u16,
    pub queue_size: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("tap {name:?} {reason}")]
    TapName { name: String, reason: &'static str },
    #[error("mac {0} is a multicast address; a device needs a unicast one")]
    MulticastMac(MacAddress),
    #[error("mac 00:00:00:00:00:00 is not a usable address")]
    ZeroMac,
    #[error("queue-pairs {0} is out of range 1..={MAX_QUEUE_PAIRS}")]
    QueuePairs(u16),
    #[error("queue-size {0} must be a power of two from 2 to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
}

impl NetConfig {
    /// Attach to the existing TAP `tap` with one queue pair and a derived MAC.
    pub fn tap(tap: impl Into<String>) -> Self {
        NetConfig {
            tap: tap.into(),
            create_tap: false,
            mac: None,
            queue_pairs: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
        }
    }

    /// The address the guest sees.
    pub fn mac(&self) -> MacAddress {
        self.mac
            .unwrap_or_else(|| MacAddress::derived_from(&self.tap))
    }

    /// Checks every field; the TAP itself is checked when it is opened.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let reason = if self.tap.is_empty() {
            Some("is empty")
        } else if self.tap.len() > MAX_TAP_NAME_LEN {
            Some("is longer than 15 bytes")
        } else if self.tap == "." || self.tap == ".." {
            Some("is not an interface name")
        } else if self
            .tap
            .bytes()
            .any(|byte| byte == b'/' || byte == b':' || byte == 0 || byte.is_ascii_whitespace())
        {
            Some("contains '/', ':', NUL or white space")
        } else {
            None
        };
        if let Some(reason) = reason {
            return Err(ConfigError::TapName {
                name: self.tap,
                reason,
            });
        }
        match self.mac {
            Some(MacAddress([0, 0, 0, 0, 0, 0])) => return Err(ConfigError::ZeroMac),
            Some(mac) if mac.is_multicast() => return Err(ConfigError::MulticastMac(mac)),
            _ => {}
        }
        if !(1..=MAX_QUEUE_PAIRS).contains(&self.queue_pairs) {
            return Err(ConfigError::QueuePairs(self.queue_pairs));
        }
        if !self.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&self.queue_size) {
            return Err(ConfigError::QueueSize(self.queue_size));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_the_derived_mac_is_local_unicast() {
        let config = NetConfig::tap("tap0").validate().unwrap();
        let mac = config.mac();
        assert_eq!(mac.0[0] & 0b11, 0b10, "{mac}");
        assert_eq!(mac, MacAddress::derived_from("tap0"));
        assert_ne!(mac, MacAddress::derived_from("tap1"));
    }

    #[test]
    fn mac_addresses_parse_and_print() {
        let mac: MacAddress = "00:16:3e:10:10:1".parse().unwrap();
        assert_eq!(mac.0, [0x00, 0x16, 0x3e, 0x10, 0x10, 0x01]);
        assert_eq!(mac.to_string(), "00:16:3e:10:10:01");
        for bad in [
            "",
            "00:16:3e:10:10",
            "00:16:3e:10:10:10:10",
            "00:16:3e:10:10:zz",
            "001:6:3e:1:1:1",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = NetConfig::tap("tap0");
        for (name, reason) in [
            ("", "is empty"),
            ("a-very-long-tap-name", "is longer than 15 bytes"),
            ("tap/0", "contains '/', ':', NUL or white space"),
            ("tap 0", "contains '/', ':', NUL or white space"),
            ("..", "is not an interface name"),
        ] {
            let config = NetConfig {
                tap: name.into(),
                ..base.clone()
            };
            assert_eq!(
                config.validate(),
                Err(ConfigError::TapName {
                    name: name.into(),
                    reason
                })
            );
        }
        let multicast = MacAddress([1, 0, 0, 0, 0, 1]);
        let config = NetConfig {
            mac: Some(multicast),
            ..base.clone()
        };
        assert_eq!(config.validate(), Err(ConfigError::MulticastMac(multicast)));
        let config = NetConfig {
            mac: Some(MacAddress([0; 6])),
            ..base.clone()
        };
        assert_eq!(config.validate(), Err(ConfigError::ZeroMac));
        for pairs in [0, MAX_QUEUE_PAIRS + 1] {
            let config = NetConfig {
                queue_pairs: pairs,
                ..base.clone()
            };
            assert_eq!(config.validate(), Err(ConfigError::QueuePairs(pairs)));
        }
        for size in [0, 1, 100, 2048] {
            let config = NetConfig {
                queue_size: size,
                ..base.clone()
            };
            assert_eq!(config.validate(), Err(ConfigError::QueueSize(size)));
        }
        let error = ConfigError::QueuePairs(9).to_string();
        assert!(error.contains("queue-pairs 9"), "{error}");
    }
}
