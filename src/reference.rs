//! Image references (`[registry/]repository[:tag][@digest]`), parsed into
//! [`oci_client::Reference`] with a regex of our own.
//!
//! oci-spec's parser matches the distribution grammar with Rust's Unicode `\w` inside a
//! `{0,127}` repetition: its compiled regex holds about 5 MiB, and each thread that uses
//! it caches another 2-3 MiB, more than the rest of a 1,000-instance run's heap. The same
//! grammar with `\w` as ASCII (as in distribution's own Go regex, and as registries accept
//! tags) and the tag's length checked apart compiles to a few KiB. The registry's default
//! and the `library/` prefix of the Docker Hub are filled in as distribution's
//! `normalize` does.

use std::sync::LazyLock;

use oci_client::{ParseError, Reference};
use regex::Regex;

/// The longest tag distribution allows.
const TAG_MAX: usize = 128;
/// The longest repository name distribution allows.
const NAME_MAX: usize = 255;

/// Group 1 is the name, 2 the tag, 3 the digest. (It compiles: the unit tests parse with
/// it; were it not to, every reference would be refused, never one let through.)
static GRAMMAR: LazyLock<Option<Regex>> = LazyLock::new(|| {
    let label = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
    let domain = format!(r"{label}(?:\.{label})*(?::[0-9]+)?");
    let component = "[a-z0-9]+(?:(?:[._]|__|-*)[a-z0-9]+)*";
    let name = format!("(?:{domain}/)?{component}(?:/{component})*");
    let tag = r"\w[\w.-]*";
    let digest = "[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}";
    Regex::new(&format!("(?-u)^({name})(?::({tag}))?(?:@({digest}))?$")).ok()
});

/// Parses `text` as [`Reference`]'s `from_str` does: a reference with neither tag nor
/// digest gets the tag `latest`.
pub fn parse(text: &str) -> Result<Reference, ParseError> {
    if text.is_empty() {
        return Err(ParseError::NameEmpty);
    }
    let parts = GRAMMAR
        .as_ref()
        .and_then(|grammar| grammar.captures(text))
        .ok_or(ParseError::ReferenceInvalidFormat)?;
    let tag = parts.get(2).map(|m| m.as_str());
    if tag.is_some_and(|t| t.len() > TAG_MAX) {
        return Err(ParseError::ReferenceInvalidFormat);
    }
    let (registry, repository) = split_domain(&parts[1]);
    if repository.len() > NAME_MAX {
        return Err(ParseError::NameTooLong);
    }
    let digest = parts.get(3).map(|m| m.as_str());
    if let Some(digest) = digest {
        let (algorithm, hex) = digest
            .split_once(':')
            .ok_or(ParseError::DigestInvalidFormat)?;
        let length = match algorithm {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => return Err(ParseError::DigestUnsupported),
        };
        if hex.len() != length {
            return Err(ParseError::DigestInvalidLength);
        }
    }
    Ok(match (tag, digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.into(), digest.into())
        }
        (None, Some(digest)) => Reference::with_digest(registry, repository, digest.into()),
        (tag, None) => Reference::with_tag(registry, repository, tag.unwrap_or("latest").into()),
    })
}

/// The registry and the repository of a name: the first component is a registry only if it
/// has a `.` or a `:`, or is `localhost`; otherwise the Docker Hub's, where a name of one
/// component is an official image under `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (first, rest),
        _ => ("docker.io", name),
    };
    let registry = if registry == "index.docker.io" {
        "docker.io"
    } else {
        registry
    };
    let repository = if registry == "docker.io" && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository.to_string()
    };
    (registry.to_string(), repository)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    /// Every case parses to what oci-spec's own parser gives, or fails with its error.
    #[test]
    fn parses_as_oci_spec_does() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let long_tag = "t".repeat(TAG_MAX);
        let too_long_tag = "t".repeat(TAG_MAX + 1);
        let long_name = format!("registry.local/{}", "a".repeat(NAME_MAX + 1));
        let cases = [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "index.docker.io/busybox".into(),
            "docker.io/swebench/sweb.eval.x86_64.django_1776_django-11099:latest".into(),
            "localhost/app".into(),
            "localhost:5000/app:v1".into(),
            "10.244.0.1:5000/imagebuild/base:abc123".into(),
            "registry.local/a/b/c:tag_with.dots-and_underscores".into(),
            "my-registry.example:443/team/image".into(),
            format!("registry.local/image@{digest}"),
            format!("registry.local/image:v2@{digest}"),
            format!("registry.local/image:{long_tag}"),
            // Refused: each for its own reason.
            String::new(),
            "Upper/case".into(),
            "registry.local/Image".into(),
            "registry.local/image:".into(),
            "registry.local/image:-tag".into(),
            "registry.local/image:ta g".into(),
            "registry.local/image,cache=1".into(),
            "registry.local//image".into(),
            "registry.local/image:tag:more".into(),
            format!("registry.local/image:{too_long_tag}"),
            long_name,
            "registry.local/image@sha256:abc".into(),
            format!("registry.local/image@md5:{}", "ab".repeat(16)),
            format!("registry.local/image@sha512:{}", "ab".repeat(32)),
        ];
        for case in &cases {
            let expected = Reference::from_str(case);
            assert_eq!(parse(case), expected, "{case:?}");
        }
        assert!(cases.iter().filter(|c| parse(c).is_ok()).count() >= 10);
        assert!(cases.iter().filter(|c| parse(c).is_err()).count() >= 10);
    }

    /// A tag with a letter that is a word character only in Unicode is refused: registries
    /// take ASCII tags only (oci-spec's Unicode `\w` lets it through).
    #[test]
    fn tags_are_ascii() {
        assert_eq!(
            parse("registry.local/image:ünïcode"),
            Err(ParseError::ReferenceInvalidFormat)
        );
        assert!(Reference::from_str("registry.local/image:ünïcode").is_ok());
    }
}
