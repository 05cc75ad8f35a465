//! Fixed-point amounts: credits and shares in millionths, as `i64`. Never floats for money.
//!
//! On the wire an amount is a decimal string with up to six decimals (`"12.5"`, `"0.000001"`)
//! or a whole JSON integer (`12`); it is always written back as a string with six decimals.
//!
//! One bound, [`MAX`], applies to every amount a command accepts or produces (inputs, balances,
//! positions, pools, payouts): the domain refuses a command that would pass it
//! ([`within`]). Reading is not bounded: anything an `i64` of millionths holds parses, so data
//! stored by any version (or under another bound) always stays readable.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error};

/// Millionths per unit.
pub const SCALE: i64 = 1_000_000;
/// The largest amount anything may hold or move: one trillion units.
pub const MAX: i64 = 1_000_000_000_000 * SCALE;

/// `Ok(v)` when `v` is within ±[`MAX`]; otherwise why, naming `field`.
pub fn within(field: &str, v: Micro) -> Result<Micro, String> {
    if v.0.unsigned_abs() <= MAX as u64 {
        Ok(v)
    } else {
        Err(format!("{field}: {v} is beyond the largest amount allowed ({} units)", MAX / SCALE))
    }
}

/// The sum of `amounts`, saturating at the ends of `i64` (folding stored data never panics).
pub fn sum(amounts: impl IntoIterator<Item = i64>) -> i64 {
    amounts.into_iter().fold(0i64, |acc, v| acc.saturating_add(v))
}

/// An amount of credits or shares in millionths.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Micro(pub i64);

impl Micro {
    pub const ZERO: Micro = Micro(0);

    pub fn units(n: i64) -> Micro {
        Micro(n * SCALE)
    }

    pub fn as_f64(self) -> f64 {
        self.0 as f64 / SCALE as f64
    }

    pub fn checked_add(self, o: Micro) -> Option<Micro> {
        self.0.checked_add(o.0).map(Micro)
    }

    pub fn checked_sub(self, o: Micro) -> Option<Micro> {
        self.0.checked_sub(o.0).map(Micro)
    }

    /// Parses `"12"`, `"12.5"`, `"-0.000001"`; at most six decimals; anything an `i64` of
    /// millionths holds (bounds are the domain's business, see [`within`]).
    pub fn parse(s: &str) -> Result<Micro, String> {
        let (neg, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if whole.is_empty() && frac.is_empty()
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(format!("{s:?} is not a decimal number"));
        }
        if frac.len() > 6 {
            return Err(format!("{s:?} has more than six decimals"));
        }
        let whole: i64 =
            if whole.is_empty() { 0 } else { whole.parse().map_err(|_| format!("{s:?} is too large"))? };
        let frac_val: i64 = format!("{frac:0<6}").parse().unwrap_or(0);
        let v = whole
            .checked_mul(SCALE)
            .and_then(|w| w.checked_add(frac_val))
            .ok_or_else(|| format!("{s:?} is too large (at most {} units)", i64::MAX / SCALE))?;
        Ok(Micro(if neg { -v } else { v }))
    }
}

/// In the OpenAPI document: a decimal string of up to 12 whole digits and six decimals, or a
/// whole JSON number (never a float); answers always carry the string.
impl utoipa::PartialSchema for Micro {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        let text = ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(r"^-?([0-9]{1,12}(\.[0-9]{0,6})?|\.[0-9]{1,6})$"))
            .description(Some("a decimal amount, up to six decimal places (\"12.5\")"));
        let whole = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(-999_999_999_999i64))
            .maximum(Some(999_999_999_999i64));
        OneOfBuilder::new().item(text).item(whole).into()
    }
}

impl utoipa::ToSchema for Micro {}

impl fmt::Display for Micro {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let a = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:06}", a / SCALE as u64, a % SCALE as u64)
    }
}

impl Serialize for Micro {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Micro {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Micro, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
            Float(f64),
        }
        match Raw::deserialize(d)? {
            Raw::Int(i) => {
                i.checked_mul(SCALE).map(Micro).ok_or_else(|| D::Error::custom(format!("{i} is too large")))
            }
            Raw::Str(s) => Micro::parse(&s).map_err(D::Error::custom),
            // A whole number written with a fraction of zero (`5.0`) is a whole number, as JSON
            // Schema counts it; any other float is refused (floats lose cents).
            Raw::Float(f) if f.fract() == 0.0 && f.abs() <= 999_999_999_999.0 => Ok(Micro(f as i64 * SCALE)),
            Raw::Float(_) => Err(D::Error::custom(
                "write amounts as a string like \"12.5\" or a whole number, not a float",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_exactly() {
        for (s, v) in [
            ("12", 12_000_000),
            ("12.5", 12_500_000),
            ("0.000001", 1),
            ("-3.25", -3_250_000),
            (".5", 500_000),
        ] {
            assert_eq!(Micro::parse(s), Ok(Micro(v)), "{s}");
        }
        assert_eq!(Micro(12_500_000).to_string(), "12.500000");
        assert_eq!(Micro(-1).to_string(), "-0.000001");
        for bad in ["", "abc", "1.0000001", "1e5", "99999999999999999999", "1.2.3", "-"] {
            assert!(Micro::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(serde_json::from_str::<Micro>("7").unwrap(), Micro(7_000_000));
        assert!(serde_json::from_str::<Micro>("7.5").unwrap_err().to_string().contains("not a float"));
        assert_eq!(serde_json::to_string(&Micro(1)).unwrap(), "\"0.000001\"");
    }

    #[test]
    fn amounts_beyond_the_bound_still_read_but_are_not_within_it() {
        // What an account granted 2×10¹² + 47 units stored: it must read back.
        let stored = "\"2000000000047.000000\"";
        let m: Micro = serde_json::from_str(stored).unwrap();
        assert_eq!(m, Micro::units(2_000_000_000_047));
        assert_eq!(serde_json::to_string(&m).unwrap(), stored);
        assert!(within("balance", m).unwrap_err().starts_with("balance: "));
        assert_eq!(within("balance", Micro(MAX)), Ok(Micro(MAX)));
        assert!(within("balance", Micro(-MAX - 1)).is_err());
    }
}
