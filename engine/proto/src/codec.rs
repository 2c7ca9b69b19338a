//! The RADIUS wire codec: a zero-copy, checked view over one datagram and a writer that
//! builds an answer into a caller-provided buffer.
//!
//! Owns: framing (SPEC §2.2), the attribute walk (including Vendor-Specific, RFC 2865 §5.26),
//! typed value readers (integers, addresses, RFC 3162 prefixes) and the answer writer.
//! Must not touch: secrets and authenticators (`auth`), policy (`decide`), allocation: nothing
//! here allocates, and no read can panic (every access is a checked `get`/`split_*`).
#![forbid(unsafe_code)]

use core::net::{Ipv4Addr, Ipv6Addr};

use crate::dict::attr;

/// Octets in the RADIUS header: Code, Identifier, Length, Authenticator.
pub const HEADER_LEN: usize = 20;
/// Largest RADIUS packet (RFC 2865 §3; SPEC §2.2).
pub const MAX_PACKET_LEN: usize = 4096;
/// Largest attribute value (an attribute's Length octet counts its two header octets).
pub const MAX_VALUE_LEN: usize = 253;
/// Length of an authenticator or a Message-Authenticator value.
pub const AUTHENTICATOR_LEN: usize = 16;

/// Why a datagram is not a RADIUS packet at all (SPEC §2.2: silently discarded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FramingError {
    /// Fewer than 20 octets arrived.
    ShorterThanHeader,
    /// The Length field says less than 20.
    LengthBelowMinimum,
    /// The Length field says more than 4096.
    LengthAboveMaximum,
    /// Fewer octets arrived than the Length field announces.
    Truncated,
}

/// An attribute whose Length octet breaks the packet's framing (SPEC §7: NAK 404 once the
/// packet is authenticated). `offset` is where the broken attribute starts in the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttributeFramingError {
    pub offset: usize,
}

/// A checked view of one RADIUS packet: exactly `Length` octets (padding after it dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    bytes: &'a [u8],
    authenticator: &'a [u8; AUTHENTICATOR_LEN],
}

impl<'a> Packet<'a> {
    /// Applies every framing rule of SPEC §2.2 (RFC 2865 §3). Octets after Length are padding
    /// and are ignored.
    pub fn parse(datagram: &'a [u8]) -> Result<Self, FramingError> {
        let Some((header, _)) = datagram.split_first_chunk::<HEADER_LEN>() else {
            return Err(FramingError::ShorterThanHeader);
        };
        let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if length < HEADER_LEN {
            return Err(FramingError::LengthBelowMinimum);
        }
        if length > MAX_PACKET_LEN {
            return Err(FramingError::LengthAboveMaximum);
        }
        let bytes = datagram.get(..length).ok_or(FramingError::Truncated)?;
        let authenticator = bytes
            .get(4..HEADER_LEN)
            .and_then(|a| a.try_into().ok())
            .ok_or(FramingError::ShorterThanHeader)?;
        Ok(Packet {
            bytes,
            authenticator,
        })
    }

    pub fn code(&self) -> u8 {
        self.header()[0]
    }

    pub fn identifier(&self) -> u8 {
        self.header()[1]
    }

    /// The Length field (equal to `self.bytes().len()`).
    pub fn length(&self) -> usize {
        self.bytes.len()
    }

    pub fn authenticator(&self) -> &'a [u8; AUTHENTICATOR_LEN] {
        self.authenticator
    }

    /// The packet's octets, exactly `Length` of them.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The attribute area (everything after the header).
    pub fn attribute_bytes(&self) -> &'a [u8] {
        self.bytes.get(HEADER_LEN..).unwrap_or(&[])
    }

    /// Walks the attributes in wire order. A framing error ends the walk.
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes {
            rest: self.attribute_bytes(),
            offset: HEADER_LEN,
        }
    }

    fn header(&self) -> &'a [u8; HEADER_LEN] {
        // `parse` guarantees at least HEADER_LEN octets; the fallback is unreachable.
        self.bytes
            .first_chunk::<HEADER_LEN>()
            .unwrap_or(&[0; HEADER_LEN])
    }
}

/// One attribute: its type, its value and where its Type octet sits in the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attribute<'a> {
    pub ty: u8,
    pub value: &'a [u8],
    pub offset: usize,
}

impl<'a> Attribute<'a> {
    /// Offset of the value's first octet in the packet.
    pub fn value_offset(&self) -> usize {
        self.offset + 2
    }

    /// The Vendor-Specific view of this attribute, if it is type 26 and long enough to hold a
    /// Vendor-Id.
    pub fn vendor_specific(&self) -> Option<VendorSpecific<'a>> {
        if self.ty != attr::VENDOR_SPECIFIC {
            return None;
        }
        VendorSpecific::parse(self.value)
    }
}

/// Iterator over a packet's attributes; yields `Err` once on a framing error, then stops.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    rest: &'a [u8],
    offset: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<Attribute<'a>, AttributeFramingError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let offset = self.offset;
        let broken = Some(Err(AttributeFramingError { offset }));
        let Some((&[ty, len], _)) = self.rest.split_first_chunk::<2>() else {
            self.rest = &[];
            return broken;
        };
        let len = usize::from(len);
        let Some((whole, rest)) = self.rest.split_at_checked(len).filter(|_| len >= 2) else {
            self.rest = &[];
            return broken;
        };
        self.rest = rest;
        self.offset += len;
        Some(Ok(Attribute {
            ty,
            value: whole.get(2..).unwrap_or(&[]),
            offset,
        }))
    }
}

/// A Vendor-Specific attribute's payload: Vendor-Id, then vendor sub-attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VendorSpecific<'a> {
    pub vendor_id: u32,
    pub data: &'a [u8],
}

impl<'a> VendorSpecific<'a> {
    pub fn parse(value: &'a [u8]) -> Option<Self> {
        let (id, data) = value.split_first_chunk::<4>()?;
        Some(VendorSpecific {
            vendor_id: u32::from_be_bytes(*id),
            data,
        })
    }

    /// Sub-attributes in the RFC 2865 §5.26 suggested format (type, length, value), used by
    /// Cisco and 3GPP. A malformed sub-attribute yields `Err` and ends the walk.
    pub fn sub_attributes(&self) -> VendorAttributes<'a> {
        VendorAttributes { rest: self.data }
    }
}

/// One vendor sub-attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VendorAttribute<'a> {
    pub ty: u8,
    pub value: &'a [u8],
}

/// Iterator over the sub-attributes of a Vendor-Specific attribute.
#[derive(Debug, Clone)]
pub struct VendorAttributes<'a> {
    rest: &'a [u8],
}

/// A vendor sub-attribute whose length does not fit its Vendor-Specific attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VendorFramingError;

impl<'a> Iterator for VendorAttributes<'a> {
    type Item = Result<VendorAttribute<'a>, VendorFramingError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let Some((&[ty, len], _)) = self.rest.split_first_chunk::<2>() else {
            self.rest = &[];
            return Some(Err(VendorFramingError));
        };
        let len = usize::from(len);
        let Some((whole, rest)) = self.rest.split_at_checked(len).filter(|_| len >= 2) else {
            self.rest = &[];
            return Some(Err(VendorFramingError));
        };
        self.rest = rest;
        Some(Ok(VendorAttribute {
            ty,
            value: whole.get(2..).unwrap_or(&[]),
        }))
    }
}

/// A value with the wrong length or encoding for its attribute (SPEC §7: NAK 407).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MalformedValue;

/// Reads an RFC 2865 `integer` (4 octets, network order).
pub fn read_u32(value: &[u8]) -> Result<u32, MalformedValue> {
    let bytes: [u8; 4] = value.try_into().map_err(|_| MalformedValue)?;
    Ok(u32::from_be_bytes(bytes))
}

/// Reads an RFC 2865 `address` (IPv4, 4 octets).
pub fn read_ipv4(value: &[u8]) -> Result<Ipv4Addr, MalformedValue> {
    let bytes: [u8; 4] = value.try_into().map_err(|_| MalformedValue)?;
    Ok(Ipv4Addr::from(bytes))
}

/// Reads an IPv6 address (16 octets, RFC 3162 §2.1 NAS-IPv6-Address).
pub fn read_ipv6(value: &[u8]) -> Result<Ipv6Addr, MalformedValue> {
    let bytes: [u8; 16] = value.try_into().map_err(|_| MalformedValue)?;
    Ok(Ipv6Addr::from(bytes))
}

/// Reads a Framed-Interface-Id (RFC 3162 §2.2, 8 octets).
pub fn read_interface_id(value: &[u8]) -> Result<u64, MalformedValue> {
    let bytes: [u8; 8] = value.try_into().map_err(|_| MalformedValue)?;
    Ok(u64::from_be_bytes(bytes))
}

/// Reads a non-empty `text`/`string` value (RFC 2865 §5: zero-length values are not sent).
pub fn read_nonempty(value: &[u8]) -> Result<&[u8], MalformedValue> {
    if value.is_empty() {
        Err(MalformedValue)
    } else {
        Ok(value)
    }
}

/// An IPv6 prefix, always stored masked to its length (SPEC §6.1 normalisation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv6Prefix {
    addr: Ipv6Addr,
    len: u8,
}

impl Ipv6Prefix {
    /// Builds a prefix, masking away every bit beyond `len`. `None` when `len > 128`.
    pub fn new(addr: Ipv6Addr, len: u8) -> Option<Self> {
        if len > 128 {
            return None;
        }
        let bits = u128::from(addr);
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(len))
        };
        Some(Ipv6Prefix {
            addr: Ipv6Addr::from(bits & mask),
            len,
        })
    }

    pub fn addr(&self) -> Ipv6Addr {
        self.addr
    }

    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads a Framed-IPv6-Prefix value (RFC 3162 §2.3): Reserved, Prefix-Length, then the
    /// prefix in 0 to 16 octets. Both the shortest form and FreeRADIUS's 16-octet form are
    /// accepted; the Reserved octet is ignored as the RFC allows.
    pub fn from_wire(value: &[u8]) -> Result<Self, MalformedValue> {
        let Some((&[_reserved, len], prefix)) = value.split_first_chunk::<2>() else {
            return Err(MalformedValue);
        };
        if len > 128 || prefix.len() > 16 || prefix.len() < usize::from(len).div_ceil(8) {
            return Err(MalformedValue);
        }
        let mut octets = [0u8; 16];
        octets
            .get_mut(..prefix.len())
            .ok_or(MalformedValue)?
            .copy_from_slice(prefix);
        Ipv6Prefix::new(Ipv6Addr::from(octets), len).ok_or(MalformedValue)
    }

    /// Writes the prefix in the 16-octet form FreeRADIUS uses; returns the value length (18).
    pub fn to_wire(&self, out: &mut [u8; 18]) -> usize {
        out[0] = 0;
        out[1] = self.len;
        out[2..].copy_from_slice(&self.addr.octets());
        18
    }
}

impl core::fmt::Display for Ipv6Prefix {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl core::str::FromStr for Ipv6Prefix {
    type Err = &'static str;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, len) = s.split_once('/').ok_or("expected ADDRESS/LENGTH")?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| "not an IPv6 address")?;
        let len: u8 = len.parse().map_err(|_| "prefix length is not a number")?;
        Ipv6Prefix::new(addr, len).ok_or("prefix length above 128")
    }
}

/// The answer could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteError {
    /// The buffer (or the 4096-octet packet limit) has no room for it.
    NoRoom,
    /// A value longer than 253 octets.
    ValueTooLong,
}

/// Builds a packet into a caller-provided buffer, without allocating. The Length field is set
/// by [`PacketWriter::finish`].
#[derive(Debug)]
pub struct PacketWriter<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl<'b> PacketWriter<'b> {
    /// Starts a packet with its header; `authenticator` is written as given (for an answer it
    /// is the request's Request Authenticator until the Response Authenticator replaces it).
    pub fn new(
        buf: &'b mut [u8],
        code: u8,
        identifier: u8,
        authenticator: &[u8; AUTHENTICATOR_LEN],
    ) -> Result<Self, WriteError> {
        let header = buf.get_mut(..HEADER_LEN).ok_or(WriteError::NoRoom)?;
        header[0] = code;
        header[1] = identifier;
        header[2] = 0;
        header[3] = HEADER_LEN as u8;
        header[4..].copy_from_slice(authenticator);
        Ok(PacketWriter {
            buf,
            len: HEADER_LEN,
        })
    }

    /// Appends one attribute; returns the offset of its value in the packet.
    pub fn push(&mut self, ty: u8, value: &[u8]) -> Result<usize, WriteError> {
        self.push_parts(ty, &[value])
    }

    /// Appends one attribute whose value is the concatenation of `parts`.
    pub fn push_parts(&mut self, ty: u8, parts: &[&[u8]]) -> Result<usize, WriteError> {
        let value_len: usize = parts.iter().map(|p| p.len()).sum();
        if value_len > MAX_VALUE_LEN {
            return Err(WriteError::ValueTooLong);
        }
        let end = self.len + 2 + value_len;
        if end > MAX_PACKET_LEN {
            return Err(WriteError::NoRoom);
        }
        let dst = self.buf.get_mut(self.len..end).ok_or(WriteError::NoRoom)?;
        let (head, mut value) = dst.split_at_mut(2);
        head[0] = ty;
        head[1] = (2 + value_len) as u8;
        for part in parts {
            let (now, rest) = value.split_at_mut(part.len());
            now.copy_from_slice(part);
            value = rest;
        }
        let value_offset = self.len + 2;
        self.len = end;
        Ok(value_offset)
    }

    /// Appends an `integer` attribute.
    pub fn push_u32(&mut self, ty: u8, v: u32) -> Result<usize, WriteError> {
        self.push(ty, &v.to_be_bytes())
    }

    /// Appends a Vendor-Specific attribute holding one sub-attribute.
    pub fn push_vendor(
        &mut self,
        vendor_id: u32,
        ty: u8,
        value: &[u8],
    ) -> Result<usize, WriteError> {
        if value.len() > MAX_VALUE_LEN - 6 {
            return Err(WriteError::ValueTooLong);
        }
        let sub_header = [ty, (value.len() + 2) as u8];
        self.push_parts(
            attr::VENDOR_SPECIFIC,
            &[&vendor_id.to_be_bytes(), &sub_header, value],
        )
    }

    /// Octets written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == HEADER_LEN
    }

    /// Sets the Length field and returns the finished packet's octets, for signing.
    pub fn finish(self) -> &'b mut [u8] {
        let len = self.len;
        let out = self.buf.get_mut(..len).unwrap_or_default();
        if let Some(field) = out.get_mut(2..4) {
            field.copy_from_slice(&(len as u16).to_be_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u8, attrs: &[u8]) -> Vec<u8> {
        let mut v = vec![code, 7, 0, 0];
        v.extend_from_slice(&[0xaa; 16]);
        v.extend_from_slice(attrs);
        let len = v.len() as u16;
        v[2..4].copy_from_slice(&len.to_be_bytes());
        v
    }

    // SPEC §2.2 (RFC 2865 §3): shorter than 20 octets is discarded.
    #[test]
    fn rfc2865_s3_datagram_shorter_than_header_is_rejected() {
        assert_eq!(
            Packet::parse(&[40; 19]),
            Err(FramingError::ShorterThanHeader)
        );
        assert_eq!(Packet::parse(&[]), Err(FramingError::ShorterThanHeader));
    }

    // SPEC §2.2: Length field < 20 or > 4096.
    #[test]
    fn rfc2865_s3_length_field_out_of_range_is_rejected() {
        let mut p = packet(40, &[]);
        p[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(Packet::parse(&p), Err(FramingError::LengthBelowMinimum));
        let mut big = vec![0u8; 5000];
        big[0] = 40;
        big[2..4].copy_from_slice(&4097u16.to_be_bytes());
        assert_eq!(Packet::parse(&big), Err(FramingError::LengthAboveMaximum));
        big[2..4].copy_from_slice(&4096u16.to_be_bytes());
        assert!(Packet::parse(&big).is_ok());
    }

    // SPEC §2.2: datagram shorter than Length is discarded; octets after Length are padding.
    #[test]
    fn rfc2865_s3_truncated_is_rejected_and_padding_ignored() {
        let p = packet(40, &[44, 4, b'a', b'b']);
        assert_eq!(
            Packet::parse(&p[..p.len() - 1]),
            Err(FramingError::Truncated)
        );
        let mut padded = p.clone();
        padded.extend_from_slice(&[1, 2, 3]);
        let parsed = Packet::parse(&padded).unwrap();
        assert_eq!(parsed.bytes(), &p[..]);
        assert_eq!(parsed.attributes().count(), 1);
    }

    #[test]
    fn attribute_walk_reports_broken_length_octet() {
        let p = packet(40, &[44, 4, b'a', b'b', 1, 9, b'x']);
        let parsed = Packet::parse(&p).unwrap();
        let items: Vec<_> = parsed.attributes().collect();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].unwrap().value, b"ab");
        assert_eq!(items[1], Err(AttributeFramingError { offset: 24 }));
        // A length octet below 2 is a framing error too.
        let p = packet(40, &[44, 1, 0]);
        let parsed = Packet::parse(&p).unwrap();
        assert!(parsed.attributes().next().unwrap().is_err());
        // A lone trailing octet.
        let p = packet(40, &[44]);
        let parsed = Packet::parse(&p).unwrap();
        assert!(parsed.attributes().next().unwrap().is_err());
    }

    #[test]
    fn vendor_specific_sub_attributes() {
        let vsa = [0, 0, 0, 9, 1, 5, b'a', b'=', b'b'];
        let p = packet(40, &[&[26, 11][..], &vsa].concat());
        let parsed = Packet::parse(&p).unwrap();
        let a = parsed.attributes().next().unwrap().unwrap();
        let v = a.vendor_specific().unwrap();
        assert_eq!(v.vendor_id, 9);
        let subs: Vec<_> = v.sub_attributes().collect();
        assert_eq!(
            subs,
            vec![Ok(VendorAttribute {
                ty: 1,
                value: b"a=b"
            })]
        );
        let bad = VendorSpecific::parse(&[0, 0, 0, 9, 1, 9, b'a']).unwrap();
        assert_eq!(bad.sub_attributes().next(), Some(Err(VendorFramingError)));
        assert!(VendorSpecific::parse(&[0, 0, 9]).is_none());
    }

    // RFC 3162 §2.3, SPEC §6.1: both encodings accepted, compared after masking.
    #[test]
    fn rfc3162_s2_3_framed_ipv6_prefix_forms_and_masking() {
        let short = [0u8, 64, 0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0];
        let mut long = [0u8; 18];
        long[1] = 64;
        long[2..8].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 2]);
        long[17] = 0xff; // host bits beyond /64: masked away
        let a = Ipv6Prefix::from_wire(&short).unwrap();
        let b = Ipv6Prefix::from_wire(&long).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "2001:db8:2::/64");
        assert_eq!(Ipv6Prefix::from_wire(&[0, 129]), Err(MalformedValue));
        assert_eq!(Ipv6Prefix::from_wire(&[0, 64, 0x20]), Err(MalformedValue));
        assert_eq!(Ipv6Prefix::from_wire(&[0]), Err(MalformedValue));
        assert_eq!("2001:db8:2::1/64".parse::<Ipv6Prefix>().unwrap(), a);
    }

    #[test]
    fn writer_builds_and_parser_reads_back() {
        let mut buf = [0u8; 64];
        let mut w = PacketWriter::new(&mut buf, 41, 9, &[3; 16]).unwrap();
        w.push_u32(attr::ERROR_CAUSE, 503).unwrap();
        w.push_vendor(9, 1, b"x=y").unwrap();
        let out = w.finish();
        let p = Packet::parse(out).unwrap();
        assert_eq!((p.code(), p.identifier(), p.length()), (41, 9, 20 + 6 + 11));
        let attrs: Vec<_> = p.attributes().map(|a| a.unwrap()).collect();
        assert_eq!(read_u32(attrs[0].value), Ok(503));
        assert_eq!(attrs[1].vendor_specific().unwrap().vendor_id, 9);
    }

    #[test]
    fn writer_refuses_overflow_without_panicking() {
        let mut small = [0u8; 24];
        let mut w = PacketWriter::new(&mut small, 41, 1, &[0; 16]).unwrap();
        assert_eq!(w.push(18, b"too long"), Err(WriteError::NoRoom));
        assert_eq!(w.push(18, &[0; 254]), Err(WriteError::ValueTooLong));
        assert!(PacketWriter::new(&mut [0u8; 19], 41, 1, &[0; 16]).is_err());
    }
}
