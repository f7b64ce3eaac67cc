//! RCPT-time decisions that need I/O, in order: the sending quotas (SPEC 3.4), then the check
//! with the primary upstream (SPEC 6.4). A recipient refused by the upstream releases what the
//! quotas reserved for it at once.

use crate::delivery::Forwarder;
use crate::quota::{Hold, Quotas};
use crate::server::{Admission, Admit, BoxFuture};
use crate::smtp::session::RecipientQuery;
use std::sync::Arc;

/// The relay's [`Admit`]: quotas and recipient verification, either optional.
#[derive(Debug, Default)]
pub struct Gate {
    pub quotas: Option<Arc<Quotas>>,
    pub verifier: Option<Arc<Forwarder>>,
}

impl Gate {
    /// Quotas always; recipient verification when some route of `config` asks for it.
    pub fn new(
        config: &mailroute_config::RelayConfig,
        quotas: Quotas,
        forwarder: &Arc<Forwarder>,
    ) -> Self {
        let verifies = config.routes.values().any(|r| r.verify_recipients);
        Self {
            quotas: Some(Arc::new(quotas)),
            verifier: verifies.then(|| Arc::clone(forwarder)),
        }
    }

    /// Whether there is anything to check (otherwise sessions need not ask).
    pub fn is_active(&self) -> bool {
        self.quotas.is_some() || self.verifier.is_some()
    }

    async fn admit_recipient(&self, query: &RecipientQuery) -> Admission {
        let mut admission = match &self.quotas {
            Some(quotas) => quotas.admit(query).await,
            None => Admission {
                verdict: Ok(()),
                hold: None,
            },
        };
        if admission.verdict.is_err() {
            return admission;
        }
        if let Some(verifier) = &self.verifier
            && let Err(refusal) = verifier.verify_recipient(query).await
        {
            if let (Some(quotas), Some(hold)) = (&self.quotas, admission.hold.take()) {
                quotas.finish(vec![hold], false).await;
            }
            admission.verdict = Err(refusal);
        }
        admission
    }
}

impl Admit for Gate {
    fn admit<'a>(&'a self, query: &'a RecipientQuery) -> BoxFuture<'a, Admission> {
        Box::pin(self.admit_recipient(query))
    }

    fn finish(&self, holds: Vec<Hold>, accepted: bool) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(quotas) = &self.quotas {
                quotas.finish(holds, accepted).await;
            }
        })
    }
}
