/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Packet parsing for the TC programs: Ethernet, ARP, IPv4, IPv6 with extension
 * headers, TCP/UDP/ICMP/ICMPv6. Anything unexpected is a drop reason. */
#ifndef VMFENCE_PARSE_BPF_H
#define VMFENCE_PARSE_BPF_H

#define TC_ACT_UNSPEC (-1)
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_IPV6 0x86DD
#define ETH_HLEN 14
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define IPPROTO_ICMPV6 58

enum { FRAG_NONE = 0, FRAG_FIRST = 1, FRAG_LATER = 2 };

union addr16 {
	__u8 b[16];
	__u32 w[4];
	__u64 q[2];
};

struct pkt {
	union addr16 saddr;     /* IPv4-mapped for IPv4 */
	union addr16 daddr;
	__u32 frag_id;          /* network order */
	__u32 l4_off;           /* L4 header offset from the frame start */
	__u32 l3_end;           /* end of the IP datagram in the frame (its length field) */
	__be16 sport;           /* ICMP: echo id; network order */
	__be16 dport;
	__u16 ethertype;        /* host order; 0 when the frame was too short */
	__u8 proto;
	__u8 family;
	__u8 frag;              /* FRAG_* */
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 tcp_flags;
	__u8 hop_limit;         /* IPv4 TTL / IPv6 hop limit */
	__u8 frag_proto;        /* IPv4 protocol / fragment header's next header:
				 * the same in every fragment of a datagram */
	__u8 smac[6];
};

struct arp_eth {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__u8 spa[4];
	__u8 tha[6];
	__u8 tpa[4];
} __attribute__((packed));

static __always_inline __u32 arp_ip(const __u8 *b)
{
	__u32 v;
	__builtin_memcpy(&v, b, 4);
	return v;
}

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) |
		(a[5] ^ b[5])) == 0;
}

static __always_inline void set_v4_mapped(union addr16 *a, __u32 v4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = bpf_htonl(0xffff);
	a->w[3] = v4;
}

static __always_inline int addr_eq(const union addr16 *a, const union addr16 *b)
{
	return a->q[0] == b->q[0] && a->q[1] == b->q[1];
}

static __always_inline int is_v4_mapped(const union addr16 *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == bpf_htonl(0xffff);
}

static __always_inline int is_link_local(const union addr16 *a)
{
	return (a->w[0] & bpf_htonl(0xffc00000)) == bpf_htonl(0xfe800000);
}

static __always_inline int is_unspecified(const union addr16 *a)
{
	return (a->q[0] | a->q[1]) == 0;
}

static __always_inline int is_multicast(const union addr16 *a)
{
	if (is_v4_mapped(a)) {
		__u32 v = bpf_ntohl(a->w[3]);
		return (v >> 28) == 0xe || v == 0xffffffff;
	}
	return a->b[0] == 0xff;
}

static __always_inline int is_icmp_error(const struct pkt *p)
{
	if (p->proto == IPPROTO_ICMP && p->family == 4)
		return p->icmp_type == 3 || p->icmp_type == 11 || p->icmp_type == 12;
	if (p->proto == IPPROTO_ICMPV6 && p->family == 6)
		return p->icmp_type >= 1 && p->icmp_type <= 4;
	return 0;
}

/* L4 ports/type from off (bounds-checked by the helper). 0 or a drop reason.
 * quoted: the header inside an ICMP error, which may hold only its first 8
 * bytes (RFC 792): TCP's ports but not its flags. */
static __always_inline __u8 parse_l4(struct __sk_buff *skb, __u32 off, struct pkt *p, int quoted)
{
	__u8 buf[14];
	__u32 need = p->proto == IPPROTO_TCP ? 14 : p->proto == IPPROTO_UDP ? 4 : 8;

	/* ICMP belongs to IPv4, ICMPv6 to IPv6; crossed, it is just a number. */
	if ((p->proto == IPPROTO_ICMP && p->family != 4) || (p->proto == IPPROTO_ICMPV6 && p->family != 6))
		return 0;
	/* What the policy reads must lie inside the datagram, not in the
	 * Ethernet padding after it. */
	if (!quoted && (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP || p->proto == IPPROTO_ICMP ||
			p->proto == IPPROTO_ICMPV6 || (p->proto == 2 && p->family == 4)) &&
	    off + need > p->l3_end)
		return VMFENCE_REASON_MALFORMED; /* (IGMP: its 8-byte header) */
	switch (p->proto) {
	case IPPROTO_TCP:
		if (quoted) {
			if (bpf_skb_load_bytes(skb, off, buf, 4))
				return VMFENCE_REASON_MALFORMED;
		} else {
			if (bpf_skb_load_bytes(skb, off, buf, 14))
				return VMFENCE_REASON_MALFORMED;
			p->tcp_flags = buf[13];
		}
		__builtin_memcpy(&p->sport, &buf[0], 2);
		__builtin_memcpy(&p->dport, &buf[2], 2);
		return 0;
	case IPPROTO_UDP:
		if (bpf_skb_load_bytes(skb, off, buf, 4))
			return VMFENCE_REASON_MALFORMED;
		__builtin_memcpy(&p->sport, &buf[0], 2);
		__builtin_memcpy(&p->dport, &buf[2], 2);
		return 0;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if (bpf_skb_load_bytes(skb, off, buf, 8))
			return VMFENCE_REASON_MALFORMED;
		p->icmp_type = buf[0];
		p->icmp_code = buf[1];
		/* Echo request/reply: the id plays the VM-side port. */
		if ((p->proto == IPPROTO_ICMP && (buf[0] == 8 || buf[0] == 0)) ||
		    (p->proto == IPPROTO_ICMPV6 && (buf[0] == 128 || buf[0] == 129))) {
			int request = buf[0] == 8 || buf[0] == 128;
			__be16 id;
			__builtin_memcpy(&id, &buf[4], 2);
			/* The VM-side port is the id: source on requests from the VM,
			 * destination on replies to it (flow keys swap sides). */
			if (request)
				p->sport = id;
			else
				p->dport = id;
		}
		return 0;
	default:
		return 0;
	}
}

/* IPv6 extension headers we walk; anything else is the upper layer. */
static __always_inline int is_ipv6_ext(__u8 nh)
{
	return nh == 0 || nh == 43 || nh == 60 || nh == 44 || nh == 51;
}

/* The frame must hold the whole datagram its IP header announces; beyond
 * it only Ethernet padding (frames of at most 60 bytes). GSO packets carry
 * the total of their segments (or 0 for BIG TCP): only the minimum holds. */
static __always_inline __u8 frame_length_reason(struct __sk_buff *skb, __u32 l3_off, __u32 l3_end,
						 int len_zero)
{
	__u32 len = skb->len;

	if (skb->gso_size)
		return 0;
	if (len_zero || l3_end > len)
		return VMFENCE_REASON_MALFORMED;
	if (len > l3_end && len > 60)
		return VMFENCE_REASON_MALFORMED;
	return 0;
}

/* IPv4 options: source routing (LSRR 131, SSRR 137) would send the packet on
 * to addresses the policy never saw. 0 or a drop reason. */
static __always_inline __u8 ipv4_options_reason(struct __sk_buff *skb, __u32 off, __u32 optlen)
{
	__u8 opt[64] = {};
	__u32 i = 0, n = optlen & 0x3f;

	if (optlen == 0)
		return 0;
	if (n == 0 || n > 40 || n != optlen)
		return VMFENCE_REASON_MALFORMED;
	if (bpf_skb_load_bytes(skb, off, opt, n))
		return VMFENCE_REASON_MALFORMED;
	for (int n = 0; n < 40; n++) {
		__u8 type, len;

		if (i >= optlen || i >= 40)
			break;
		type = opt[i & 0x3f];
		if (type == 0) /* end of options */
			break;
		if (type == 1) { /* no-op */
			i++;
			continue;
		}
		if (type == 131 || type == 137)
			return VMFENCE_REASON_MALFORMED;
		if (i + 1 >= optlen || i + 1 >= 40)
			return VMFENCE_REASON_MALFORMED;
		len = opt[(i + 1) & 0x3f];
		if (len < 2)
			return VMFENCE_REASON_MALFORMED;
		i += len;
	}
	return 0;
}

static __always_inline __u8 parse_ipv6(struct __sk_buff *skb, __u32 off, struct pkt *p, int quoted)
{
	struct ipv6hdr ip6;
	int seen_frag = 0;
	__u8 nh;

	if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)))
		return VMFENCE_REASON_MALFORMED;
	if (ip6.version != 6)
		return VMFENCE_REASON_MALFORMED;
	__builtin_memcpy(p->saddr.b, &ip6.saddr, 16);
	__builtin_memcpy(p->daddr.b, &ip6.daddr, 16);
	/* IPv4-mapped addresses never appear on the wire (RFC 4291 2.5.5.2);
	 * here they would read as IPv4 in the shared address space. */
	if (is_v4_mapped(&p->saddr) || is_v4_mapped(&p->daddr))
		return VMFENCE_REASON_MALFORMED;
	p->family = 6;
	p->hop_limit = ip6.hop_limit;
	p->l3_end = off + sizeof(ip6) + bpf_ntohs(ip6.payload_len);
	if (!ip6.payload_len && skb->gso_size && !quoted)
		p->l3_end = skb->len; /* BIG TCP: the length is the skb's */
	if (!quoted) {
		__u8 r = frame_length_reason(skb, off, p->l3_end, ip6.payload_len == 0);
		if (r)
			return r;
	}
	nh = ip6.nexthdr;
	off += sizeof(ip6);
	for (int i = 0; i < 6; i++) {
		__u8 eh[8];

		if (!is_ipv6_ext(nh))
			break;
		if (nh == 0 && i > 0) /* hop-by-hop only first (RFC 8200 4.1) */
			return VMFENCE_REASON_MALFORMED;
		if (bpf_skb_load_bytes(skb, off, eh, 8))
			return VMFENCE_REASON_MALFORMED;
		if (nh == 44) {
			__u16 fo = ((__u16)eh[2] << 8) | eh[3];

			if (p->frag != FRAG_NONE || seen_frag)
				return VMFENCE_REASON_MALFORMED; /* one per packet (RFC 8200 4.5) */
			seen_frag = 1;
			__builtin_memcpy(&p->frag_id, &eh[4], 4);
			off += 8;
			nh = eh[0];
			p->frag_proto = nh;
			if (fo >> 3) {
				/* What follows is payload, whatever nh says. */
				p->frag = FRAG_LATER;
				break;
			}
			if (fo & 1)
				p->frag = FRAG_FIRST;
			continue;
		}
		/* A routing header with segments left sends the packet on to
		 * addresses the policy never saw (RH0, SRv6): not allowed. */
		if (nh == 43 && eh[3] != 0)
			return VMFENCE_REASON_MALFORMED;
		if (nh == 51) /* AH counts its length in 4-byte units, minus 2 */
			off += ((__u32)eh[1] + 2) * 4;
		else
			off += ((__u32)eh[1] + 1) * 8;
		if (!quoted && off > p->l3_end)
			return VMFENCE_REASON_MALFORMED; /* runs past the payload */
		nh = eh[0];
	}
	if (p->frag != FRAG_LATER && is_ipv6_ext(nh))
		return VMFENCE_REASON_MALFORMED; /* too many extension headers */
	p->proto = nh;
	p->l4_off = off;
	if (p->frag == FRAG_LATER)
		return 0;
	return parse_l4(skb, off, p, quoted);
}

static __always_inline __u8 parse_ipv4_at(struct __sk_buff *skb, __u32 off, struct pkt *p, int quoted)
{
	struct iphdr ip;
	__u16 fo;

	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)))
		return VMFENCE_REASON_MALFORMED;
	if (ip.version != 4 || ip.ihl < 5)
		return VMFENCE_REASON_MALFORMED;
	set_v4_mapped(&p->saddr, ip.saddr);
	set_v4_mapped(&p->daddr, ip.daddr);
	p->family = 4;
	p->proto = ip.protocol;
	p->frag_id = ip.id;
	p->frag_proto = ip.protocol;
	p->hop_limit = ip.ttl;
	p->l3_end = off + bpf_ntohs(ip.tot_len);
	if (!ip.tot_len && skb->gso_size && !quoted)
		p->l3_end = skb->len; /* BIG TCP: the length is the skb's */
	if (!quoted) {
		__u8 r = frame_length_reason(skb, off, p->l3_end, 0);
		if (!r && bpf_ntohs(ip.tot_len) < ip.ihl * 4 && !skb->gso_size)
			r = VMFENCE_REASON_MALFORMED;
		if (!r)
			r = ipv4_options_reason(skb, off + sizeof(ip), ip.ihl * 4 - sizeof(ip));
		if (r)
			return r;
	}
	fo = bpf_ntohs(ip.frag_off);
	if (fo & 0x1fff)
		p->frag = FRAG_LATER;
	else if (fo & 0x2000)
		p->frag = FRAG_FIRST;
	off += ip.ihl * 4;
	p->l4_off = off;
	if (p->frag == FRAG_LATER)
		return 0;
	return parse_l4(skb, off, p, quoted);
}

/* Parse a frame. Returns 0 or a drop reason; p->ethertype is set as soon as
 * the Ethernet header is there (so the MAC check runs even on bad L3). */
static __always_inline __u8 parse(struct __sk_buff *skb, void *data, void *data_end, struct pkt *p)
{
	struct ethhdr *eth = data;
	struct iphdr *ip;

	if ((void *)(eth + 1) > data_end)
		return VMFENCE_REASON_MALFORMED;
	__builtin_memcpy(p->smac, eth->h_source, 6);
	p->ethertype = bpf_ntohs(eth->h_proto);
	switch (p->ethertype) {
	case ETH_P_ARP:
		return 0;
	case ETH_P_IPV6:
		return parse_ipv6(skb, ETH_HLEN, p, 0);
	case ETH_P_IP:
		break;
	default:
		return VMFENCE_REASON_BAD_ETHERTYPE; /* VLAN tags, PPPoE, ... */
	}
	/* Fast path: IPv4 without options, TCP/UDP, direct packet access. */
	/* Headers outside the linear area (GSO from vhost-net, small linear
	 * parts) take the bpf_skb_load_bytes path: never malformed for that. */
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) <= data_end && ip->ihl == 5 && ip->version == 4 &&
	    !(ip->frag_off & bpf_htons(0x3fff)) &&
	    (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP)) {
		__u8 *l4 = (void *)(ip + 1);
		__u32 l3_end = ETH_HLEN + bpf_ntohs(ip->tot_len);
		__u8 r;

		if ((void *)(l4 + 14) > data_end || l3_end < ETH_HLEN + sizeof(*ip) + 14)
			return parse_ipv4_at(skb, ETH_HLEN, p, 0);
		r = frame_length_reason(skb, ETH_HLEN, l3_end, 0);
		if (r)
			return r;
		set_v4_mapped(&p->saddr, ip->saddr);
		set_v4_mapped(&p->daddr, ip->daddr);
		p->family = 4;
		p->proto = ip->protocol;
		p->hop_limit = ip->ttl;
		p->l3_end = l3_end;
		p->l4_off = ETH_HLEN + sizeof(*ip);
		__builtin_memcpy(&p->sport, l4, 2);
		__builtin_memcpy(&p->dport, l4 + 2, 2);
		if (ip->protocol == IPPROTO_TCP)
			p->tcp_flags = l4[13];
		return 0;
	}
	return parse_ipv4_at(skb, ETH_HLEN, p, 0);
}

/* The header embedded in an ICMP error: the offending packet as the VM sent
 * it. Returns 0 on success. */
static __always_inline int parse_icmp_inner(struct __sk_buff *skb, const struct pkt *outer, struct pkt *inner)
{
	__u32 off = outer->l4_off + 8;

	if (outer->proto == IPPROTO_ICMP) {
		if (parse_ipv4_at(skb, off, inner, 1))
			return -1;
	} else {
		/* Its extension headers walked like the outer packet's, so the
		 * quoted flow is found behind a fragment or options header. */
		if (parse_ipv6(skb, off, inner, 1))
			return -1;
	}
	return 0;
}

#endif
