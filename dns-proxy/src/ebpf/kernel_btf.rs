//! Where this kernel keeps a new cgroup's id and hierarchy ([`CgroupOffsets`]), read from its
//! BTF (`/sys/kernel/btf/vmlinux`), for `raw_tp/cgroup_mkdir`: the struct layouts change with
//! the kernel's version and configuration.
//!
//! One pass over the type section for three structs' members. Not `btf-rs`: it indexes every
//! type first, which took 46 MiB and 98 ms here for these four numbers (this: the file's
//! 5.2 MiB, read once and dropped, and a few milliseconds). aya's loader parses the kernel's
//! BTF too, for its own use, and offers no lookup of a struct's members.
use std::{fs, io, path::Path};

use dns_proxy_common::CgroupOffsets;

/// Where the running kernel describes its types.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The offsets in the kernel described by the BTF at `path`.
pub fn cgroup_offsets(path: &Path) -> Result<CgroupOffsets, BtfError> {
    let btf = fs::read(path).map_err(|source| BtfError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let found = member_offsets(
        &btf,
        &[
            ("cgroup", "kn"),
            ("cgroup", "root"),
            ("cgroup_root", "hierarchy_id"),
            ("kernfs_node", "id"),
        ],
    )?;
    Ok(CgroupOffsets {
        cgroup_kn: found[0],
        cgroup_root: found[1],
        root_hierarchy_id: found[2],
        kernfs_node_id: found[3],
    })
}

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "cannot read the kernel's BTF at {path} ({source}): a kernel built without \
         CONFIG_DEBUG_INFO_BTF, or, in a container, /sys not the host's"
    )]
    Read { path: String, source: io::Error },
    #[error("the kernel's BTF is malformed or of a layout this agent does not know: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no member {member} in struct {owner}")]
    NoMember {
        owner: &'static str,
        member: &'static str,
    },
}

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;

/// The byte offset of each `(struct, member)` of `wanted`, in its order: a direct member of
/// the first struct of that name that has members (a bit field is not one).
fn member_offsets(
    btf: &[u8],
    wanted: &[(&'static str, &'static str)],
) -> Result<Vec<u32>, BtfError> {
    let malformed = BtfError::Malformed;
    let u16_at = |at: usize| {
        btf.get(at..at + 2)
            .map(|bytes| u16::from_ne_bytes([bytes[0], bytes[1]]))
    };
    let u32_at = |at: usize| {
        btf.get(at..at + 4)
            .map(|bytes| u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    };
    if u16_at(0) != Some(BTF_MAGIC) {
        return Err(malformed("no BTF magic in this byte order"));
    }
    let header = |field: usize| u32_at(8 + 4 * field).map(|value| value as usize);
    let (Some(header_len), Some(types_at), Some(types_len), Some(strings_at), Some(strings_len)) = (
        u32_at(4).map(|value| value as usize),
        header(0),
        header(1),
        header(2),
        header(3),
    ) else {
        return Err(malformed("a short header"));
    };
    let types = btf
        .get(header_len + types_at..header_len + types_at + types_len)
        .ok_or(malformed("the type section is out of the file"))?;
    let strings = btf
        .get(header_len + strings_at..header_len + strings_at + strings_len)
        .ok_or(malformed("the string section is out of the file"))?;
    let name = |offset: u32| -> Option<&[u8]> {
        let rest = strings.get(offset as usize..)?;
        rest.split(|&byte| byte == 0).next()
    };
    let type_u32 = |at: usize| {
        types
            .get(at..at + 4)
            .map(|bytes| u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    };

    let mut found: Vec<Option<u32>> = vec![None; wanted.len()];
    let mut structs_seen: Vec<&str> = Vec::new();
    let mut at = 0;
    while at < types.len() {
        let (Some(name_offset), Some(info)) = (type_u32(at), type_u32(at + 4)) else {
            return Err(malformed("a type cut short"));
        };
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kind_flag = info >> 31 == 1;
        let extra = match kind {
            // INT, VAR, DECL_TAG
            1 | 14 | 17 => 4,
            // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
            2 | 7..=12 | 16 | 18 => 0,
            // ARRAY
            3 => 12,
            // STRUCT, UNION, DATASEC, ENUM64
            4 | 5 | 15 | 19 => 12 * vlen,
            // ENUM, FUNC_PROTO
            6 | 13 => 8 * vlen,
            _ => return Err(malformed("a type of a kind this agent does not know")),
        };
        let members_at = at + 12;
        if kind == KIND_STRUCT && vlen > 0 {
            let struct_name = name(name_offset).unwrap_or_default();
            for (index, (r#struct, member)) in wanted.iter().enumerate() {
                if found[index].is_some()
                    || struct_name != r#struct.as_bytes()
                    || structs_seen.contains(r#struct)
                {
                    continue;
                }
                for m in 0..vlen {
                    let member_at = members_at + 12 * m;
                    let (Some(member_name), Some(offset)) =
                        (type_u32(member_at), type_u32(member_at + 8))
                    else {
                        return Err(malformed("a struct's members cut short"));
                    };
                    if name(member_name) != Some(member.as_bytes()) {
                        continue;
                    }
                    // With the kind flag, the top byte is a bit field's size.
                    let (bits, bit_field) = if kind_flag {
                        (offset & 0x00ff_ffff, offset >> 24 != 0)
                    } else {
                        (offset, false)
                    };
                    if !bit_field && bits % 8 == 0 {
                        found[index] = Some(bits / 8);
                    }
                    break;
                }
            }
            // The first struct of a name is the kernel's: later ones are not looked at.
            for (r#struct, _) in wanted {
                if struct_name == r#struct.as_bytes() && !structs_seen.contains(r#struct) {
                    structs_seen.push(r#struct);
                }
            }
        }
        at = members_at + extra;
    }
    wanted
        .iter()
        .zip(found)
        .map(|(&(owner, member), offset)| offset.ok_or(BtfError::NoMember { owner, member }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob of `structs`: each a name and its members' names and bit offsets (the
    /// members' types are not read: all type id 0).
    fn btf_of(structs: &[(&str, &[(&str, u32)])], kind_flag: bool) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut string = |text: &str| {
            let at = strings.len() as u32;
            strings.extend_from_slice(text.as_bytes());
            strings.push(0);
            at
        };
        let mut types = Vec::new();
        // An INT and a PTR before, so that the walk steps over kinds of other sizes.
        for word in [string("int"), 1 << 24, 4, 32, 0, 2 << 24, 1] {
            types.extend_from_slice(&word.to_ne_bytes());
        }
        for (name, members) in structs {
            let info = (KIND_STRUCT << 24) | members.len() as u32 | (u32::from(kind_flag) << 31);
            for word in [string(name), info, 64] {
                types.extend_from_slice(&word.to_ne_bytes());
            }
            for (member, offset) in *members {
                for word in [string(member), 1, *offset] {
                    types.extend_from_slice(&word.to_ne_bytes());
                }
            }
        }
        let mut btf = Vec::new();
        btf.extend_from_slice(&BTF_MAGIC.to_ne_bytes());
        btf.extend_from_slice(&[1, 0]);
        for word in [
            24,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            btf.extend_from_slice(&word.to_ne_bytes());
        }
        btf.extend(types);
        btf.extend(strings);
        btf
    }

    #[test]
    fn finds_each_members_offset_in_bytes() {
        let btf = btf_of(
            &[
                ("kernfs_node", &[("count", 0), ("id", 768)]),
                ("cgroup", &[("self", 0), ("kn", 2048), ("root", 5568)]),
                ("cgroup_root", &[("kf_root", 0), ("hierarchy_id", 96)]),
            ],
            false,
        );
        let wanted = [
            ("cgroup", "kn"),
            ("cgroup", "root"),
            ("cgroup_root", "hierarchy_id"),
            ("kernfs_node", "id"),
        ];
        assert_eq!(member_offsets(&btf, &wanted).unwrap(), [256, 696, 12, 96]);
    }

    #[test]
    fn a_missing_member_a_bit_field_or_a_second_struct_of_the_name_is_not_taken() {
        let btf = btf_of(
            &[("cgroup", &[("self", 0)]), ("cgroup", &[("kn", 64)])],
            false,
        );
        let error = member_offsets(&btf, &[("cgroup", "kn")]).unwrap_err();
        assert!(
            matches!(error, BtfError::NoMember { member: "kn", .. }),
            "{error}"
        );
        let bit_field = btf_of(&[("cgroup", &[("kn", (3 << 24) | 64)])], true);
        assert!(member_offsets(&bit_field, &[("cgroup", "kn")]).is_err());
        let flagged_whole = btf_of(&[("cgroup", &[("kn", 64)])], true);
        assert_eq!(
            member_offsets(&flagged_whole, &[("cgroup", "kn")]).unwrap(),
            [8]
        );
    }

    #[test]
    fn a_truncated_or_foreign_blob_is_an_error_not_a_panic() {
        let btf = btf_of(&[("cgroup", &[("kn", 64)])], false);
        for len in 0..btf.len() {
            let _ = member_offsets(&btf[..len], &[("cgroup", "kn")]);
        }
        assert!(matches!(
            member_offsets(b"not btf at all", &[("cgroup", "kn")]),
            Err(BtfError::Malformed(_))
        ));
    }

    /// The running kernel's: what the agent will read.
    #[test]
    fn this_kernels_btf_has_every_offset() {
        let offsets = cgroup_offsets(Path::new(KERNEL_BTF)).unwrap();
        assert!(offsets.cgroup_kn > 0 && offsets.cgroup_root > offsets.cgroup_kn);
        assert!(offsets.kernfs_node_id > 0);
    }
}
