//! The RCPT decision's pure steps, one table row at a time (docs/admission.md).

use super::binding::{BoundBy, bind};
use super::relay::check;
use crate::auth::accounts::Accounts;
use crate::interfaces::{RefusalReason, SessionFacts};
use crate::tenants::Tenants;
use mailroute_config::{Manifests, compile};
use std::net::IpAddr;

const YAML: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: accounts, namespace: mail}
stringData: {app: secret}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {name: acme, namespace: mail}
spec:
  domains: [acme.example, eu.mail.acme.co.uk]
  licenses: 5
  users: [dev@acme.example]
  authentication:
    ipRanges: [{cidr: 10.1.0.0/16}, {cidr: "2001:db8::/112"}]
    requireSMTPAuth: false
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {name: zeta, namespace: mail}
spec:
  domains: [zeta.example]
  licenses: 5
  requireTLS: true
  allowedSenders: RegisteredUsers
  users: [App@Zeta.example]
  authentication:
    ipRanges: [{cidr: 10.1.2.0/24}]
    requireSMTPAuth: true
    credentialsSecretRef: {name: accounts}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {name: tls, namespace: mail}
spec:
  domains: [secure.example]
  licenses: 1
  requireTLS: true
  authentication:
    ipRanges: [{cidr: 10.3.0.0/16}]
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {name: any, namespace: mail}
spec:
  domains: [b.example, a.example]
  licenses: 1
  allowedSenders: Any
  authentication:
    ipRanges: [{cidr: 10.9.0.0/16}]
"#;

/// `Ok(rewritten sender)`, or the reply's text and the reason.
type Verdict = Result<Option<String>, (String, RefusalReason)>;

struct World {
    tenants: Tenants,
    accounts: Accounts,
}

fn world() -> World {
    let mut m = Manifests::default();
    m.add_yaml(std::path::Path::new("t.yaml"), YAML)
        .unwrap_or_else(|e| panic!("{e}"));
    let compiled = compile(&m.namespaces.remove("mail").unwrap_or_default());
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    World {
        tenants: Tenants::new(&compiled.config),
        accounts: Accounts::from_credentials(&compiled.credentials),
    }
}

fn facts(ip: &str, helo: Option<&str>, user: Option<&str>, tls: bool) -> SessionFacts {
    SessionFacts {
        client: ip.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}")),
        helo: helo.map(str::to_owned),
        authenticated: user.map(str::to_owned),
        tls,
    }
}

impl World {
    /// `(tenant, how, authorised)` of a session.
    fn bound(&self, f: &SessionFacts) -> (Option<&str>, Option<BoundBy>, bool) {
        let b = bind(&self.tenants, &self.accounts, f);
        (
            b.tenant.map(|id| &*self.tenants.get(id).name),
            b.by,
            b.authorised,
        )
    }

    /// The reply code and reason, or `Ok` with the rewritten sender.
    fn decide(&self, f: &SessionFacts, sender: &str, recipient: &str) -> Verdict {
        let b = bind(&self.tenants, &self.accounts, f);
        check(
            &self.tenants,
            &b,
            f.tls,
            f.helo.as_deref(),
            sender,
            recipient,
        )
        .map(|p| p.rewrite_sender)
        .map_err(|r| (r.reply.to_string(), r.reason))
    }
}

#[test]
fn binding_prefers_auth_then_the_most_specific_range_then_helo() {
    let w = world();
    use BoundBy::*;
    let cases = [
        (
            facts("10.1.9.9", None, None, false),
            (Some("acme"), Some(Range), true),
        ),
        // 10.1.2.0/24 (zeta) is more specific than 10.1.0.0/16 (acme), and zeta needs AUTH.
        (
            facts("10.1.2.3", None, None, false),
            (Some("zeta"), Some(Range), false),
        ),
        (
            facts("10.1.2.3", None, Some("app"), true),
            (Some("zeta"), Some(Auth), true),
        ),
        // AUTH alone is not enough when the tenant also lists ranges.
        (
            facts("192.0.2.1", None, Some("app"), true),
            (Some("zeta"), Some(Auth), false),
        ),
        (
            facts("::ffff:10.1.0.1", None, None, false),
            (Some("acme"), Some(Range), true),
        ),
        (
            facts("2001:db8::5", None, None, false),
            (Some("acme"), Some(Range), true),
        ),
        // EHLO names the tenant, never authorises.
        (
            facts("192.0.2.1", Some("ACME.example"), None, false),
            (Some("acme"), Some(Ehlo), false),
        ),
        (
            facts("192.0.2.1", Some("mta.acme.example"), None, false),
            (None, None, false),
        ),
    ];
    for (f, want) in cases {
        assert_eq!(w.bound(&f), want, "{f:?}");
    }
}

#[test]
fn every_refusal_of_relay_policy_has_its_reply_and_reason() {
    let w = world();
    let outsider = facts("192.0.2.1", Some("acme.example"), None, false);
    let acme = facts("10.1.9.9", None, None, false);
    let zeta_auth = facts("10.1.2.3", None, Some("app"), true);
    let tls_client = facts("10.3.0.7", None, None, false);
    let tls_client_tls = facts("10.3.0.7", None, None, true);
    let outsider_tls = facts("192.0.2.1", None, None, true);
    use RefusalReason::*;
    let refused = |code: &str, reason| Err((code.to_owned(), reason));
    let cases: Vec<(&SessionFacts, &str, &str, Verdict)> = vec![
        // Inbound is open to anyone, in any case and subdomain, and to parents up to the
        // registrable domain.
        (&outsider, "a@x.example", "alice@acme.example", Ok(None)),
        (&outsider, "a@x.example", "bob@sub.acme.example", Ok(None)),
        (&outsider, "a@x.example", "x@mail.acme.co.uk", Ok(None)),
        (&outsider, "a@x.example", "x@acme.co.uk", Ok(None)),
        // No open relay, whatever the EHLO says.
        (
            &outsider,
            "alice@acme.example",
            "victim@external.example",
            refused("550 5.7.1 Relaying denied", RelayDenied),
        ),
        (
            &outsider,
            "a@x.example",
            "x@co.uk",
            refused("550 5.7.1", RelayDenied),
        ),
        (
            &outsider,
            "a@x.example",
            "victim%external.example@acme.example",
            refused("550 5.7.1", RelayDenied),
        ),
        (
            &outsider,
            "a@x.example",
            "external.example!victim@acme.example",
            refused("550 5.7.1", RelayDenied),
        ),
        (
            &outsider,
            "a@x.example",
            "\"victim@external.example\"@acme.example",
            refused("550 5.7.1", RelayDenied),
        ),
        (
            &outsider,
            "a@x.example",
            "victim@[192.0.2.7]",
            refused("550 5.7.1", RelayDenied),
        ),
        (
            &outsider,
            "a@x.example",
            "victim@external.example.",
            refused("550 5.7.1", RelayDenied),
        ),
        // An authorised network relays for its own domains (and bounces).
        (&acme, "dev@acme.example", "x@external.example", Ok(None)),
        (
            &acme,
            "noreply@sub.acme.example",
            "x@external.example",
            Ok(None),
        ),
        (&acme, "", "x@external.example", Ok(None)),
        (
            &acme,
            "ceo@zeta.example",
            "x@external.example",
            refused("550 5.7.1 Sender address not allowed", Sender),
        ),
        (
            &acme,
            "spoof@gmail.example",
            "x@external.example",
            refused("550 5.7.1 Sender address not allowed", Sender),
        ),
        // RegisteredUsers, compared as one mailbox whatever the case.
        (
            &zeta_auth,
            "app@zeta.example",
            "x@external.example",
            Ok(None),
        ),
        (
            &zeta_auth,
            "APP@ZETA.EXAMPLE",
            "x@external.example",
            Ok(None),
        ),
        (
            &zeta_auth,
            "other@zeta.example",
            "x@external.example",
            refused(
                "550 5.7.1 Sender address not allowed: not a registered user",
                Sender,
            ),
        ),
        (
            &zeta_auth,
            "anyone@else.example",
            "dev@acme.example",
            Ok(None),
        ),
        // requireTLS binds inbound mail and everything the tenant's clients relay.
        (
            &outsider,
            "a@x.example",
            "carol@zeta.example",
            refused("530 5.7.0", TlsRequired),
        ),
        (&outsider_tls, "a@x.example", "carol@zeta.example", Ok(None)),
        (
            &tls_client,
            "app@secure.example",
            "x@external.example",
            refused("530 5.7.0", TlsRequired),
        ),
        (
            &tls_client,
            "app@secure.example",
            "dev@acme.example",
            refused("530 5.7.0", TlsRequired),
        ),
        (
            &tls_client_tls,
            "app@secure.example",
            "x@external.example",
            Ok(None),
        ),
    ];
    for (f, sender, recipient, want) in cases {
        let got = w.decide(f, sender, recipient);
        match (&got, &want) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{sender} -> {recipient}"),
            (Err((reply, reason)), Err((prefix, want_reason))) => {
                assert!(
                    reply.starts_with(prefix),
                    "{sender} -> {recipient}: {reply}"
                );
                assert_eq!(reason, want_reason, "{sender} -> {recipient}");
            }
            _ => panic!("{sender} -> {recipient}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn any_senders_are_rewritten_to_postmaster_of_the_domain_the_ehlo_name_lies_in() {
    let w = world();
    let out = "x@external.example";
    let cases = [
        (
            None,
            "app@vendor.example",
            out,
            Some("postmaster@a.example"),
        ),
        // The EHLO name is the tenant domain, or lies in it.
        (Some("B.example"), "", out, Some("postmaster@b.example")),
        (
            Some("mta1.b.example"),
            "app@vendor.example",
            out,
            Some("postmaster@b.example"),
        ),
        (
            Some("mta.vendor.example"),
            "",
            out,
            Some("postmaster@a.example"),
        ),
        // Own domains are kept; inbound mail is never rewritten.
        (None, "me@sub.a.example", out, None),
        (None, "app@vendor.example", "x@a.example", None),
    ];
    for (helo, sender, recipient, want) in cases {
        let f = facts("10.9.0.1", helo, None, false);
        assert_eq!(
            w.decide(&f, sender, recipient),
            Ok(want.map(str::to_owned)),
            "{helo:?} {sender} -> {recipient}"
        );
    }
}
