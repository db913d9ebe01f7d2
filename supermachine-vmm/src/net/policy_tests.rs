use std::net::IpAddr;

use super::*;

fn allow(text: &str) -> Rule {
    Rule::parse(Action::Allow, text).unwrap_or_else(|e| panic!("{e}"))
}

fn deny(text: &str) -> Rule {
    Rule::parse(Action::Deny, text).unwrap_or_else(|e| panic!("{e}"))
}

fn tcp<'a>(address: &str, port: u16, names: &'a [&'a str]) -> Flow<'a> {
    Flow {
        protocol: Protocol::Tcp,
        address: address.parse::<IpAddr>().unwrap(),
        port,
        names,
        server_name: None,
    }
}

#[test]
fn public_refuses_private_loopback_link_local_and_multicast_in_both_families() {
    let policy = Policy::public();
    for refused in [
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "100.64.0.1",
        "127.0.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.251",
        "255.255.255.255",
        "::1",
        "::",
        "fd00::1",
        "fe80::1",
        "ff02::1",
        // IPv4-mapped addresses are judged as the IPv4 address they carry.
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
    ] {
        assert!(
            policy.check(&tcp(refused, 80, &[])).is_err(),
            "{refused} must be refused"
        );
    }
    for allowed in [
        "203.0.113.10",
        "198.51.100.1",
        "192.0.2.1",
        "8.8.8.8",
        "172.32.0.1",
        "100.128.0.1",
        "2001:db8::1",
        "2606:4700::1111",
        "::ffff:203.0.113.10",
    ] {
        assert_eq!(
            policy.check(&tcp(allowed, 443, &[])),
            Ok(()),
            "{allowed} is public"
        );
    }
    let metadata = policy.check(&tcp("169.254.169.254", 80, &[])).unwrap_err();
    assert_eq!(
        metadata.to_string(),
        "169.254.0.0/16 (link-local (cloud metadata)) is refused by default; allow it with a rule"
    );
}

#[test]
fn deny_any_with_allow_rules_is_an_allow_list_of_ranges_and_ports() {
    let policy = Policy::public()
        .rule(deny("any"))
        .rule(allow("203.0.113.0/24:80"))
        .rule(allow("[2001:db8::/32]:8000-8080/tcp"));
    assert_eq!(policy.check(&tcp("203.0.113.7", 80, &[])), Ok(()));
    assert_eq!(
        policy.check(&tcp("203.0.113.7", 81, &[])),
        Err(Refusal::Rule("deny any".into()))
    );
    assert!(policy.check(&tcp("198.51.100.1", 80, &[])).is_err());
    assert_eq!(policy.check(&tcp("2001:db8::5", 8080, &[])), Ok(()));
    assert!(policy.check(&tcp("2001:db8::5", 8081, &[])).is_err());
    let udp = Flow {
        protocol: Protocol::Udp,
        ..tcp("2001:db8::5", 8000, &[])
    };
    assert!(policy.check(&udp).is_err(), "the rule is for TCP only");
}

#[test]
fn allow_rules_reach_ranges_the_base_policy_refuses() {
    let policy = Policy::public().rule(allow("10.1.2.3:5432"));
    assert_eq!(policy.check(&tcp("10.1.2.3", 5432, &[])), Ok(()));
    assert!(policy.check(&tcp("10.1.2.3", 22, &[])).is_err());
    assert!(policy.check(&tcp("10.1.2.4", 5432, &[])).is_err());
}

#[test]
fn deny_rules_refuse_public_destinations_and_allow_wins_whatever_the_order() {
    let policy = Policy::public()
        .rule(allow("203.0.113.10"))
        .rule(deny("203.0.113.0/24"));
    assert_eq!(policy.check(&tcp("203.0.113.10", 1, &[])), Ok(()));
    assert_eq!(
        policy.check(&tcp("203.0.113.11", 1, &[])),
        Err(Refusal::Rule("deny 203.0.113.0/24".into()))
    );
}

#[test]
fn domain_rules_match_resolved_names_and_server_names() {
    let policy = Policy::public()
        .rule(deny("any"))
        .rule(allow("allowed.test:443"))
        .rule(allow("*.cdn.test"));
    assert_eq!(
        policy.check(&tcp("203.0.113.5", 443, &["allowed.test"])),
        Ok(())
    );
    assert_eq!(
        policy.check(&tcp("203.0.113.5", 443, &["ALLOWED.test."])),
        Ok(()),
        "case and a trailing dot do not matter"
    );
    assert!(
        policy
            .check(&tcp("203.0.113.5", 443, &["other.test"]))
            .is_err(),
        "another name of the same address"
    );
    assert!(policy.check(&tcp("203.0.113.5", 443, &[])).is_err());
    assert!(policy
        .check(&tcp("203.0.113.5", 80, &["allowed.test"]))
        .is_err());
    assert_eq!(
        policy.check(&tcp("203.0.113.6", 80, &["a.b.cdn.test"])),
        Ok(())
    );
    assert!(
        policy
            .check(&tcp("203.0.113.6", 80, &["cdn.test"]))
            .is_err(),
        "`*.cdn.test` does not match cdn.test itself"
    );
    assert!(policy
        .check(&tcp("203.0.113.6", 80, &["xcdn.test"]))
        .is_err());
    let sni = Flow {
        server_name: Some("allowed.test"),
        ..tcp("203.0.113.9", 443, &[])
    };
    assert_eq!(policy.check(&sni), Ok(()));
}

#[test]
fn rules_parse_and_print_back() {
    for (text, shown) in [
        ("any", "allow any"),
        ("*", "allow any"),
        ("203.0.113.0/24", "allow 203.0.113.0/24"),
        ("203.0.113.10:443", "allow 203.0.113.10/32:443"),
        (
            "203.0.113.10:1000-2000/udp",
            "allow 203.0.113.10/32:1000-2000/udp",
        ),
        ("2001:db8::/32", "allow 2001:db8::/32"),
        ("[2001:db8::1]:443", "allow [2001:db8::1/128]:443"),
        ("Example.COM.", "allow example.com"),
        ("*.example.com:443/tcp", "allow *.example.com:443/tcp"),
        ("any:53/udp", "allow any:53/udp"),
    ] {
        assert_eq!(allow(text).to_string(), shown, "{text}");
    }
}

#[test]
fn bad_rules_are_refused_with_one_line_reasons() {
    for (text, reason) in [
        ("", "no destination"),
        (
            "203.0.113.1/24",
            "host bits set; the range is 203.0.113.0/24",
        ),
        ("203.0.113.0/33", "not an address or a CIDR range"),
        ("300.1.1.1", "not an address or a CIDR range"),
        ("203.0.113.0/24:0", "port \"0\""),
        ("203.0.113.0/24:70000", "port \"70000\""),
        ("203.0.113.0/24:90-80", "range 90-80 is empty"),
        ("example.com:", "port \"\""),
        ("exa mple.com", "not a domain name"),
        ("foo.*.com", "not a domain name"),
        ("-foo.com", "not a domain name"),
        ("[2001:db8::1", "without its ']'"),
        ("[2001:db8::1]443", "after ']'"),
    ] {
        let err = Rule::parse(Action::Deny, text).expect_err(text);
        let message = err.to_string();
        assert!(
            message.contains(reason) && !message.contains('\n'),
            "{text}: {message}"
        );
        assert!(message.starts_with(&format!("network rule {text:?}: ")));
    }
}
