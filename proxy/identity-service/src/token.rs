//! A cheap look at a token before it costs a TokenReview: a Kubernetes ServiceAccount token is
//! a JWT (three base64url parts, a JSON header, a JSON payload) issued for an audience and with
//! an expiry. Anything else is refused here, without a call to the API server. The signature
//! is not checked: that is the TokenReview's job; this only sheds garbage.

use base64::Engine as _;

/// Why a token is not even a JWT for the audience.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum NotAJwt {
    #[error("a JWT has three dot-separated parts")]
    Parts,
    #[error("a JWT's parts are base64url")]
    Base64,
    #[error("the JWT header is not a JSON object")]
    Header,
    #[error("the JWT payload is not a JSON object")]
    Payload,
    #[error("the token is not issued for audience {0}")]
    Audience(String),
    #[error("the token has expired")]
    Expired,
}

/// Base64url with or without padding (JWTs have none; a padded one is still recognisable).
const B64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Whether `token` could be a JWT issued for `audience` (any, when `None`) that has not
/// expired at `now` (seconds since the Unix epoch).
pub(crate) fn precheck(token: &str, audience: Option<&str>, now: u64) -> Result<(), NotAJwt> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(NotAJwt::Parts);
    };
    if header.is_empty() || payload.is_empty() || signature.is_empty() {
        return Err(NotAJwt::Parts);
    }
    let object =
        |part: &str| -> Result<Option<serde_json::Map<String, serde_json::Value>>, NotAJwt> {
            let bytes = B64.decode(part).map_err(|_| NotAJwt::Base64)?;
            Ok(match serde_json::from_slice(&bytes) {
                Ok(serde_json::Value::Object(map)) => Some(map),
                _ => None,
            })
        };
    B64.decode(signature).map_err(|_| NotAJwt::Base64)?;
    object(header)?.ok_or(NotAJwt::Header)?;
    let claims = object(payload)?.ok_or(NotAJwt::Payload)?;
    if let Some(audience) = audience {
        let issued_for = match claims.get("aud") {
            Some(serde_json::Value::String(a)) => a == audience,
            Some(serde_json::Value::Array(all)) => all.iter().any(|a| a.as_str() == Some(audience)),
            _ => false,
        };
        if !issued_for {
            return Err(NotAJwt::Audience(audience.to_owned()));
        }
    }
    // A token without `exp` is left to the TokenReview (legacy Secret tokens have none).
    if let Some(exp) = claims.get("exp").and_then(serde_json::Value::as_f64)
        && exp <= now as f64
    {
        return Err(NotAJwt::Expired);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) fn fake_jwt(claims: &serde_json::Value) -> String {
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"RS256","kid":"k"}"#),
        b64(claims.to_string().as_bytes()),
        b64(b"signature")
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const AUD: &str = "identity.l5d.io";
    const NOW: u64 = 1_800_000_000;

    #[test]
    fn only_jwts_for_the_audience_pass() {
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let good = fake_jwt(&json!({"aud": [AUD, "other"], "exp": NOW + 600, "sub": "x"}));
        let cases: Vec<(String, Option<&str>, Result<(), NotAJwt>)> = vec![
            (good.clone(), Some(AUD), Ok(())),
            (good.clone(), None, Ok(())),
            (
                fake_jwt(&json!({"aud": AUD, "exp": NOW + 1})),
                Some(AUD),
                Ok(()),
            ),
            (fake_jwt(&json!({"aud": AUD})), Some(AUD), Ok(())),
            ("web-token".into(), Some(AUD), Err(NotAJwt::Parts)),
            ("a.b".into(), Some(AUD), Err(NotAJwt::Parts)),
            (format!("{good}.extra"), Some(AUD), Err(NotAJwt::Parts)),
            ("..".into(), Some(AUD), Err(NotAJwt::Parts)),
            ("a!.b.c".into(), Some(AUD), Err(NotAJwt::Base64)),
            (
                format!("{}.{}.c2ln", b64("[1]"), b64("{}")),
                Some(AUD),
                Err(NotAJwt::Header),
            ),
            (
                format!("{}.{}.c2ln", b64("{}"), b64("null")),
                Some(AUD),
                Err(NotAJwt::Payload),
            ),
            (
                format!("{}.{}.c2ln", b64("{}"), b64("{")),
                Some(AUD),
                Err(NotAJwt::Payload),
            ),
            (
                fake_jwt(&json!({"aud": ["kubernetes.default.svc"], "exp": NOW + 600})),
                Some(AUD),
                Err(NotAJwt::Audience(AUD.into())),
            ),
            (
                fake_jwt(&json!({"exp": NOW + 600})),
                Some(AUD),
                Err(NotAJwt::Audience(AUD.into())),
            ),
            (
                fake_jwt(&json!({"aud": AUD, "exp": NOW})),
                Some(AUD),
                Err(NotAJwt::Expired),
            ),
            (
                fake_jwt(&json!({"aud": AUD, "exp": NOW - 3600})),
                None,
                Err(NotAJwt::Expired),
            ),
        ];
        for (token, audience, expected) in cases {
            assert_eq!(
                precheck(&token, audience, NOW),
                expected,
                "{token} {audience:?}"
            );
        }
    }
}
