//! Byte sizes as people write them (`10G`, `512MiB`, `4096`) and as tables show them.

/// Why a size string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// Empty input.
    #[error("size is empty; write a number with an optional unit, e.g. 10G or 512M")]
    Empty,
    /// The number part is not a whole number.
    #[error("size {0:?} does not start with a whole number; write e.g. 10G or 512M")]
    NotANumber(String),
    /// The unit is not one we know.
    #[error("size {input:?} has unknown unit {unit:?}; use K, M, G, T or P (powers of 1024), optionally followed by iB or B")]
    UnknownUnit { input: String, unit: String },
    /// The value does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a size: a whole number followed by an optional binary unit
/// (`K`, `M`, `G`, `T`, `P`, also written `KiB`/`KB`; all powers of 1024, as block tools use).
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(SizeError::NotANumber(input.to_string()));
    }
    let n: u64 = digits.parse().map_err(|_| SizeError::Overflow(input.to_string()))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => return Err(SizeError::UnknownUnit { input: input.to_string(), unit: unit.to_string() }),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| SizeError::Overflow(input.to_string()))
}

/// Formats bytes with the largest binary unit that keeps one decimal, e.g. `10.0 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1t"), Ok(1 << 40));
        assert_eq!(parse_size(" 3 K "), Ok(3 << 10));
    }

    #[test]
    fn refuses_garbage_with_a_hint() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("G"), Err(SizeError::NotANumber(_))));
        assert!(matches!(parse_size("10X"), Err(SizeError::UnknownUnit { .. })));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::UnknownUnit { .. })));
        assert!(matches!(parse_size("99999999999P"), Err(SizeError::Overflow(_))));
        assert!(parse_size("10X").unwrap_err().to_string().contains("use K, M, G"));
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(10 << 30), "10.0 GiB");
        assert_eq!(format_size(1536), "1.5 KiB");
    }
}
