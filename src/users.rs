//! Users and groups, read from `/etc/passwd` and `/etc/group` directly.
//!
//! clusterd is meant to be a static binary, and static glibc has no NSS, so
//! `getpwnam(3)` cannot be trusted; the files are parsed here instead. The
//! parsers are pure and lenient: comments, blank lines and malformed lines are
//! skipped, as the C library does.

/// The passwd database.
pub const PASSWD: &str = "/etc/passwd";

/// The group database.
pub const GROUP: &str = "/etc/group";

/// One `/etc/passwd` entry (the fields clusterd needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
}

/// One `/etc/group` entry (the fields clusterd needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Group name.
    pub name: String,
    /// Group id.
    pub gid: u32,
}

/// Parses passwd text (`name:password:uid:gid:gecos:home:shell`).
pub fn parse_passwd(text: &str) -> Vec<User> {
    records(text)
        .filter_map(|f| {
            Some(User {
                name: (*f.first()?).to_owned(),
                uid: id(f.get(2)?)?,
                gid: id(f.get(3)?)?,
            })
        })
        .collect()
}

/// Parses group text (`name:password:gid:members`).
pub fn parse_group(text: &str) -> Vec<Group> {
    records(text)
        .filter_map(|f| {
            Some(Group {
                name: (*f.first()?).to_owned(),
                gid: id(f.get(2)?)?,
            })
        })
        .collect()
}

/// The colon-separated fields of each line that is neither blank nor a
/// comment and has a non-empty name.
fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split(':').collect::<Vec<_>>())
        .filter(|fields| fields.first().is_some_and(|name| !name.is_empty()))
}

/// A numeric id: ASCII digits only, fitting in a `u32`.
fn id(field: &str) -> Option<u32> {
    if field.is_empty() || !field.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    field.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, uid: u32, gid: u32) -> User {
        User {
            name: name.into(),
            uid,
            gid,
        }
    }

    #[test]
    fn passwd() {
        let text = "\
# comment
root:x:0:0:root:/root:/bin/bash

daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
  www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin  \r
broken line
short:x:5
baduid:x:-1:0::/:/bin/sh
badgid:x:7:seven::/:/bin/sh
huge:x:4294967296:0::/:/bin/sh
:x:8:8::/:/bin/sh
+::::::
app:x:1000:1001:App,,,:/home/app:/bin/sh
";
        assert_eq!(
            parse_passwd(text),
            vec![
                user("root", 0, 0),
                user("daemon", 1, 1),
                user("www-data", 33, 33),
                user("app", 1000, 1001),
            ]
        );
    }

    #[test]
    fn passwd_minimal_fields_and_empty() {
        // Busybox and hand-written files sometimes stop after the gid.
        assert_eq!(parse_passwd("a:x:1:2"), vec![user("a", 1, 2)]);
        assert_eq!(parse_passwd(""), vec![]);
        assert_eq!(parse_passwd("\n\n# only comments\n"), vec![]);
    }

    #[test]
    fn group() {
        let text = "\
# comment
root:x:0:

www-data:x:33:alice,bob
nogid:x::
bad:x:x:
short:x
staff:*:50
";
        assert_eq!(
            parse_group(text),
            vec![
                Group {
                    name: "root".into(),
                    gid: 0
                },
                Group {
                    name: "www-data".into(),
                    gid: 33
                },
                Group {
                    name: "staff".into(),
                    gid: 50
                },
            ]
        );
    }
}
