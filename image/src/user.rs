//! `-u USER[:GROUP]` the way docker (runc's libcontainer/user) resolves it against the
//! image's /etc/passwd and /etc/group, kept beside the disk when the layers are unpacked.

use crate::{io_err, Error, Result, User};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct UserFiles {
    pub passwd: Option<String>,
    pub group: Option<String>,
}

impl UserFiles {
    pub(crate) fn save(&self, path: &Path) -> Result<()> {
        let bytes = serde_json::to_vec(self).expect("user files serialize");
        crate::owner_only::file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
            .map_err(io_err(format!("writing {}", path.display())))
    }
}

pub(crate) struct UserDb {
    /// (name, uid, gid)
    users: Vec<(String, u32, u32)>,
    /// (name, gid, members)
    groups: Vec<(String, u32, Vec<String>)>,
}

impl UserDb {
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
        let files: UserFiles = serde_json::from_slice(&bytes).map_err(|e| Error::InvalidImage {
            origin: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self::parse(&files))
    }

    pub(crate) fn parse(files: &UserFiles) -> Self {
        let fields = |text: &str| -> Vec<Vec<String>> {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| l.split(':').map(str::to_string).collect())
                .collect()
        };
        let users = files
            .passwd
            .as_deref()
            .map(fields)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| {
                (f.len() >= 4)
                    .then(|| Some((f[0].clone(), f[2].parse().ok()?, f[3].parse().ok()?)))?
            })
            .collect();
        let groups = files
            .group
            .as_deref()
            .map(fields)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| {
                if f.len() < 3 {
                    return None;
                }
                let members = f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                Some((f[0].clone(), f[2].parse().ok()?, members))
            })
            .collect();
        Self { users, groups }
    }

    /// `""` is root. A user part is a name from /etc/passwd or a number (that need not be in
    /// it); without a group part the gid is the user's from /etc/passwd (0 when unknown) and
    /// the additional gids are the /etc/group memberships of the user's name. A group part is
    /// a name from /etc/group or a number, and then there are no additional gids.
    pub(crate) fn resolve(&self, spec: &str) -> Result<User> {
        let err = |reason: String| Error::User {
            user: spec.to_string(),
            reason,
        };
        let (user_part, group_part) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        let (uid, mut gid, name) = if user_part.is_empty() {
            match self.users.iter().find(|(_, uid, _)| *uid == 0) {
                Some((name, _, gid)) => (0, *gid, Some(name.clone())),
                None => (0, 0, None),
            }
        } else if let Some((name, uid, gid)) = self.users.iter().find(|(n, _, _)| n == user_part) {
            (*uid, *gid, Some(name.clone()))
        } else if let Ok(uid) = user_part.parse::<u32>() {
            match self.users.iter().find(|(_, u, _)| *u == uid) {
                Some((name, _, gid)) => (uid, *gid, Some(name.clone())),
                None => (uid, 0, None),
            }
        } else {
            return Err(err(format!(
                "no user {user_part:?} in the image's /etc/passwd"
            )));
        };
        let mut additional_gids = Vec::new();
        match group_part {
            Some(g) if !g.is_empty() => {
                gid = if let Some((_, gid, _)) = self.groups.iter().find(|(n, _, _)| n == g) {
                    *gid
                } else if let Ok(gid) = g.parse::<u32>() {
                    gid
                } else {
                    return Err(err(format!("no group {g:?} in the image's /etc/group")));
                };
            }
            Some(_) => return Err(err("an empty group".into())),
            None => {
                if let Some(name) = &name {
                    for (_, g, members) in &self.groups {
                        if members.iter().any(|m| m == name) && !additional_gids.contains(g) {
                            additional_gids.push(*g);
                        }
                    }
                }
            }
        }
        Ok(User {
            uid,
            gid,
            additional_gids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> UserDb {
        UserDb::parse(&UserFiles {
            passwd: Some(
                "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n\
                 # comment\nbob:x:1001:100::/:/bin/false\n"
                    .into(),
            ),
            group: Some(
                "root:x:0:\nusers:x:100:alice\nalice:x:1000:\nwheel:x:10:alice,bob\n".into(),
            ),
        })
    }

    fn user(uid: u32, gid: u32, additional_gids: &[u32]) -> User {
        User {
            uid,
            gid,
            additional_gids: additional_gids.to_vec(),
        }
    }

    #[test]
    fn docker_semantics() {
        let db = db();
        assert_eq!(db.resolve("").unwrap(), user(0, 0, &[]));
        assert_eq!(db.resolve("alice").unwrap(), user(1000, 1000, &[100, 10]));
        assert_eq!(db.resolve("1000").unwrap(), user(1000, 1000, &[100, 10]));
        assert_eq!(db.resolve("bob").unwrap(), user(1001, 100, &[10]));
        assert_eq!(db.resolve("alice:wheel").unwrap(), user(1000, 10, &[]));
        assert_eq!(db.resolve("alice:5").unwrap(), user(1000, 5, &[]));
        assert_eq!(db.resolve("4242").unwrap(), user(4242, 0, &[]));
        assert_eq!(db.resolve("4242:4343").unwrap(), user(4242, 4343, &[]));
        let e = db.resolve("mallory").unwrap_err().to_string();
        assert!(e.contains("mallory") && e.contains("/etc/passwd"), "{e}");
        let e = db.resolve("alice:nogroup").unwrap_err().to_string();
        assert!(e.contains("nogroup") && e.contains("/etc/group"), "{e}");
    }

    #[test]
    fn numeric_ids_without_files() {
        let db = UserDb::parse(&UserFiles::default());
        assert_eq!(db.resolve("65534:65534").unwrap(), user(65534, 65534, &[]));
        assert_eq!(db.resolve("0").unwrap(), user(0, 0, &[]));
        assert!(db.resolve("nobody").is_err());
    }
}
