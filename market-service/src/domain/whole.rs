//! Whole numbers as JSON Schema counts them: `21` and `21.0` alike (a number whose fraction is
//! zero is an integer there), refused with a clear reason otherwise.

use serde::{Deserialize, Deserializer, de::Error};

fn whole<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Float(f64),
    }
    match Raw::deserialize(d).map_err(|_| D::Error::custom("expected a whole number"))? {
        Raw::Int(n) => Ok(n),
        Raw::Float(f) if f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&f) => Ok(f as u64),
        Raw::Float(f) => Err(D::Error::custom(format!("expected a whole number, not {f}"))),
    }
}

pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    whole(d)
}

pub fn usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = whole(d)?;
    usize::try_from(n).map_err(|_| D::Error::custom(format!("{n} is too large")))
}

pub fn option_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    struct Whole(#[serde(deserialize_with = "whole")] u64);
    Ok(Option::<Whole>::deserialize(d)?.map(|w| w.0))
}
