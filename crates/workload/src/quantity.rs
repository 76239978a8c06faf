//! Kubernetes resource quantities (`500m`, `128Mi`, `1.5G`, `2e3`), read as the API machinery
//! reads them: a decimal number, then a binary-SI suffix (`Ki`..`Ei`), a decimal-SI suffix
//! (`n`, `u`, `m`, `k`, `M`..`E`) or an exponent (`e3`). Values are rounded up, as
//! `Quantity.Value()` and `MilliValue()` round.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error("{0:?} is not a quantity (a number with an optional suffix such as m, Ki, Mi, G)")]
    Syntax(String),
    #[error("{0:?} is negative")]
    Negative(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// The quantity in whole units (bytes for memory), rounded up.
pub fn value(q: &str) -> Result<u64, QuantityError> {
    scaled(q, 0)
}

/// The quantity in thousandths (millicores for CPU), rounded up.
pub fn milli_value(q: &str) -> Result<u64, QuantityError> {
    scaled(q, 3)
}

/// `q * 10^exp10`, rounded up.
fn scaled(q: &str, exp10: i32) -> Result<u64, QuantityError> {
    let syntax = || QuantityError::Syntax(q.to_string());
    let too_large = || QuantityError::TooLarge(q.to_string());
    let s = q.trim();
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(syntax());
    }
    // The number as mantissa * 10^exp.
    let mut mantissa: u128 = 0;
    for d in int.bytes().chain(frac.bytes()) {
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(d - b'0')))
            .ok_or_else(too_large)?;
    }
    let mut exp = exp10 - i32::try_from(frac.len()).map_err(|_| syntax())?;
    let mut binary: u32 = 0;
    match suffix {
        "" => {}
        "Ki" => binary = 10,
        "Mi" => binary = 20,
        "Gi" => binary = 30,
        "Ti" => binary = 40,
        "Pi" => binary = 50,
        "Ei" => binary = 60,
        "n" => exp -= 9,
        "u" => exp -= 6,
        "m" => exp -= 3,
        "k" => exp += 3,
        "M" => exp += 6,
        "G" => exp += 9,
        "T" => exp += 12,
        "P" => exp += 15,
        "E" => exp += 18,
        e if e.starts_with(['e', 'E']) => {
            let n: i32 = e[1..].parse().map_err(|_| syntax())?;
            if !(-30..=30).contains(&n) {
                return Err(too_large());
            }
            exp += n;
        }
        _ => return Err(syntax()),
    }
    if negative && mantissa != 0 {
        return Err(QuantityError::Negative(q.to_string()));
    }
    if mantissa != 0 && mantissa.leading_zeros() < binary {
        return Err(too_large());
    }
    mantissa <<= binary;
    let v = if exp >= 0 {
        10u128
            .checked_pow(exp.unsigned_abs())
            .and_then(|p| mantissa.checked_mul(p))
            .ok_or_else(too_large)?
    } else {
        match 10u128.checked_pow(exp.unsigned_abs()) {
            Some(p) => mantissa.div_ceil(p),
            None => u128::from(mantissa != 0),
        }
    };
    u64::try_from(v).map_err(|_| too_large())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_cpu_as_kubernetes_reads_them() {
        assert_eq!(value("128Mi"), Ok(128 << 20));
        assert_eq!(value("1G"), Ok(1_000_000_000));
        assert_eq!(value("1.5Gi"), Ok(3 << 29));
        assert_eq!(value("64"), Ok(64));
        assert_eq!(value("2e3"), Ok(2000));
        assert_eq!(value("1k"), Ok(1000));
        assert_eq!(value("100m"), Ok(1), "rounded up");
        assert_eq!(milli_value("500m"), Ok(500));
        assert_eq!(milli_value("2"), Ok(2000));
        assert_eq!(milli_value("0.25"), Ok(250));
        assert_eq!(milli_value("1.0005"), Ok(1001), "rounded up");
        assert_eq!(milli_value("250000u"), Ok(250));
        assert_eq!(milli_value("0"), Ok(0));
        assert_eq!(milli_value("-0"), Ok(0));
    }

    #[test]
    fn refuses_what_is_not_a_quantity() {
        for bad in ["", "Mi", "1.2.3", "12x", "1 Mi", ".", "1e", "e3", "1Mib"] {
            assert!(
                matches!(value(bad), Err(QuantityError::Syntax(_))),
                "{bad:?}: {:?}",
                value(bad)
            );
        }
        assert!(matches!(value("-1Mi"), Err(QuantityError::Negative(_))));
        assert!(matches!(value("100Ei"), Err(QuantityError::TooLarge(_))));
        assert!(matches!(value("1e30"), Err(QuantityError::TooLarge(_))));
    }
}
