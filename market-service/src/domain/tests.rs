use proptest::prelude::*;

use super::*;

/// A whole ledger in memory: the accounts and markets as folds of their events, plus every
/// event kept so replays can be compared.
#[derive(Default)]
struct Ledger {
    accounts: BTreeMap<String, Account>,
    markets: BTreeMap<String, Market>,
    market_log: BTreeMap<String, Vec<MarketEvent>>,
    granted: i64,
}

impl Ledger {
    fn account_events(&mut self, id: &str, events: Vec<AccountEvent>) {
        for e in events {
            let next = Account::apply(self.accounts.remove(id), id, &e).expect("valid account event");
            self.accounts.insert(id.to_string(), next);
        }
    }

    fn market_events(&mut self, id: &str, events: Vec<MarketEvent>) {
        for e in events {
            let next = Market::apply(self.markets.remove(id), id, &e).expect("valid market event");
            self.markets.insert(id.to_string(), next);
            self.market_log.entry(id.to_string()).or_default().push(e);
        }
    }

    fn credit(&mut self, market: &str, credits: BTreeMap<String, Micro>, reason: &str) {
        for (acc, amount) in credits {
            if amount.0 > 0 {
                self.account_events(
                    &acc,
                    vec![AccountEvent::FundsCredited {
                        amount,
                        market: market.into(),
                        reason: reason.into(),
                    }],
                );
            }
        }
    }

    fn check_invariants(&self) {
        let balances: i64 = self.accounts.values().map(|a| a.balance.0).sum();
        let pools: i64 = self.markets.values().map(|m| m.pool.0).sum();
        assert_eq!(balances + pools, self.granted, "money is conserved");
        for a in self.accounts.values() {
            assert!(a.balance.0 >= 0, "no negative balance: {a:?}");
        }
        for m in self.markets.values() {
            assert!(m.pool.0 >= 0);
            let sum: f64 = m.prices().iter().sum();
            assert!((sum - 1.0).abs() < 1e-9, "prices sum to 1: {sum}");
            for (i, q) in m.shares.iter().enumerate() {
                let held: i64 = m.positions.values().map(|p| p[i].shares.0).sum();
                assert_eq!(held, q.0, "outstanding shares equal the positions");
                assert!(q.0 >= 0);
                if matches!(m.status, Status::Open | Status::Closed) {
                    assert!(m.pool.0 >= q.0, "the pool covers outcome {i} winning");
                }
            }
            for p in m.positions.values().flatten() {
                assert!(p.shares.0 >= 0, "no negative position");
            }
            if matches!(m.status, Status::Resolved | Status::Cancelled) {
                assert_eq!(m.pool.0, 0, "a final market has paid out everything");
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Cmd {
    Grant(usize, i64),
    Create(usize, usize, i64),
    Trade(usize, usize, usize, bool, i64),
    Close(usize),
    Resolve(usize, usize),
    Cancel(usize),
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        2 => (0..4usize, 1..5_000i64).prop_map(|(a, n)| Cmd::Grant(a, n)),
        2 => (0..4usize, 2..5usize, 1..500i64).prop_map(|(a, n, b)| Cmd::Create(a, n, b)),
        8 => (0..4usize, 0..3usize, 0..5usize, any::<bool>(), 1..200_000_000i64).prop_map(|(a, m, o, buy, s)| Cmd::Trade(a, m, o, buy, s)),
        1 => (0..3usize).prop_map(Cmd::Close),
        1 => (0..3usize, 0..5usize).prop_map(|(m, o)| Cmd::Resolve(m, o)),
        1 => (0..3usize).prop_map(Cmd::Cancel),
    ]
}

fn run(cmds: &[Cmd]) -> Ledger {
    let mut l = Ledger::default();
    let mut now = 1_000u64;
    for i in 0..4 {
        let id = format!("acc{i}");
        l.account_events(&id, vec![AccountEvent::AccountOpened { name: id.clone() }]);
    }
    for c in cmds {
        now += 1;
        match *c {
            Cmd::Grant(a, n) => {
                let id = format!("acc{a}");
                l.granted += Micro::units(n).0;
                l.account_events(
                    &id,
                    vec![AccountEvent::FundsGranted { amount: Micro::units(n), by: "admin".into() }],
                );
            }
            Cmd::Create(a, n, b) => {
                let creator = l.accounts[&format!("acc{a}")].clone();
                let id = format!("m{}", l.markets.len());
                let c = CreateMarket {
                    question: "Will it?".into(),
                    description: String::new(),
                    category: "test".into(),
                    outcomes: (0..n).map(|i| format!("o{i}")).collect(),
                    close_time_ms: now + 1_000_000,
                    liquidity: Micro::units(b),
                };
                if let Ok((me, ae)) = create_market(&id, &c, &creator, now) {
                    l.market_events(&id, me);
                    l.account_events(&creator.id, ae);
                }
            }
            Cmd::Trade(a, m, o, buy, s) => {
                let Some(market) = l.markets.get(&format!("m{m}")).cloned() else { continue };
                let acc = l.accounts[&format!("acc{a}")].clone();
                let t = Trade {
                    outcome: o,
                    side: if buy { Side::Buy } else { Side::Sell },
                    shares: Micro(s),
                    max_cost: None,
                    min_proceeds: None,
                };
                if let Ok((me, ae, _)) = trade(&market, &acc, &t, now) {
                    l.market_events(&market.id, me);
                    l.account_events(&acc.id, ae);
                }
            }
            Cmd::Close(m) => {
                let Some(market) = l.markets.get(&format!("m{m}")).cloned() else { continue };
                if let Some(e) = close(&market, market.close_time_ms) {
                    l.market_events(&market.id, vec![e]);
                }
            }
            Cmd::Resolve(m, o) => {
                let Some(market) = l.markets.get(&format!("m{m}")).cloned() else { continue };
                if let Ok((me, credits)) = resolve(&market, o, "admin", true, now) {
                    l.market_events(&market.id, me);
                    l.credit(&market.id, credits, "settlement");
                }
            }
            Cmd::Cancel(m) => {
                let Some(market) = l.markets.get(&format!("m{m}")).cloned() else { continue };
                if let Ok((me, credits)) = cancel(&market, "admin", true, now) {
                    l.market_events(&market.id, me);
                    l.credit(&market.id, credits, "refund");
                }
            }
        }
        l.check_invariants();
    }
    l
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_command_sequences_keep_every_invariant(cmds in proptest::collection::vec(cmd(), 1..80)) {
        run(&cmds);
    }

    #[test]
    fn snapshot_plus_tail_equals_full_replay(cmds in proptest::collection::vec(cmd(), 1..80), cut in 0usize..100) {
        let l = run(&cmds);
        for (id, log) in &l.market_log {
            let full = Market::replay(None, id, log);
            let k = cut % (log.len() + 1);
            let snapshot = Market::replay(None, id, &log[..k]);
            // A snapshot is stored as JSON: round-trip it as the store does.
            let snapshot: Option<Market> = serde_json::from_str(&serde_json::to_string(&snapshot).unwrap()).unwrap();
            let resumed = Market::replay(snapshot, id, &log[k..]);
            prop_assert_eq!(&resumed, &full);
            prop_assert_eq!(full.as_ref(), l.markets.get(id));
        }
    }
}

fn funded(balance: i64) -> Account {
    Account {
        id: "alice".into(),
        version: 2,
        name: "Alice".into(),
        balance: Micro::units(balance),
        granted: Micro::units(balance),
    }
}

fn market(creator: &Account) -> Market {
    let c = CreateMarket {
        question: "Rain tomorrow?".into(),
        description: String::new(),
        category: "weather".into(),
        outcomes: vec!["yes".into(), "no".into()],
        close_time_ms: 10_000,
        liquidity: Micro::units(100),
    };
    let (events, _) = create_market("m1", &c, creator, 1_000).unwrap();
    Market::replay(None, "m1", &events).unwrap()
}

/// Issue #15.1: the one bound on amounts, checked on what a command would produce.
#[test]
fn commands_past_the_bound_on_amounts_are_refused_naming_the_field() {
    let max_units = money::MAX / money::SCALE;
    let rich = funded(max_units);
    let m = market(&funded(1_000));
    fn too_large<T>(r: Result<T, DomainError>) -> &'static str {
        match r {
            Err(DomainError::TooLarge(field, _)) => field,
            Err(other) => panic!("expected TooLarge, got {other:?}"),
            Ok(_) => panic!("expected TooLarge, got Ok"),
        }
    }
    assert_eq!(too_large(grant(&rich, Micro(1), "admin")), "balance");
    assert_eq!(too_large(grant(&funded(0), Micro(money::MAX + 1), "admin")), "amount");
    assert_eq!(too_large(credit(&rich, Micro(1), "m1", "settlement")), "balance");
    assert_eq!(too_large(quote(&m, 0, Side::Buy, Micro(money::MAX + 1))), "shares");
    assert!(grant(&funded(max_units - 1), Micro::units(1), "admin").is_ok(), "up to the bound is fine");
    // Folding stored data past the bound saturates instead of overflowing.
    let huge = AccountEvent::FundsGranted { amount: Micro(i64::MAX), by: "old".into() };
    let folded = Account::apply(Some(rich.clone()), "alice", &huge).unwrap();
    assert_eq!(folded.balance, Micro(i64::MAX));
}

#[test]
fn trading_refuses_what_it_must() {
    let alice = funded(1_000);
    let m = market(&alice);
    let buy = |shares: i64| Trade {
        outcome: 0,
        side: Side::Buy,
        shares: Micro::units(shares),
        max_cost: None,
        min_proceeds: None,
    };
    assert!(matches!(
        trade(&m, &alice, &buy(1_000_000), 2_000),
        Err(DomainError::InsufficientBalance { .. })
    ));
    assert!(matches!(
        trade(&m, &alice, &Trade { max_cost: Some(Micro::units(1)), ..buy(10) }, 2_000),
        Err(DomainError::Slippage(_))
    ));
    assert!(matches!(
        trade(&m, &alice, &Trade { outcome: 7, ..buy(1) }, 2_000),
        Err(DomainError::Invalid { field: "outcome", .. })
    ));
    assert!(matches!(trade(&m, &alice, &buy(0), 2_000), Err(DomainError::Invalid { field: "shares", .. })));
    assert!(matches!(
        trade(&m, &alice, &Trade { side: Side::Sell, ..buy(1) }, 2_000),
        Err(DomainError::InsufficientShares { .. })
    ));
    assert!(
        matches!(trade(&m, &alice, &buy(1), 10_000), Err(DomainError::WrongStatus(..))),
        "no trade at or after the close time"
    );
    let closed = Market::apply(Some(m.clone()), "m1", &close(&m, 10_000).unwrap()).unwrap();
    assert!(matches!(
        trade(&closed, &alice, &buy(1), 2_000),
        Err(DomainError::WrongStatus(Status::Closed, _))
    ));
    // Only the creator or an admin changes, resolves or cancels a market.
    assert!(matches!(resolve(&m, 0, "bob", false, 2_000), Err(DomainError::Forbidden(_))));
    assert!(matches!(cancel(&m, "bob", false, 2_000), Err(DomainError::Forbidden(_))));
    let update = |by, admin| update_market(&m, Some("x".into()), None, (by, admin), 2_000);
    assert!(matches!(update("bob", false), Err(DomainError::Forbidden(_))));
    assert!(update("alice", false).is_ok() && update("ops", true).is_ok());
    assert!(cancel(&m, "ops", true, 2_000).is_ok());
}

#[test]
fn a_buy_moves_the_price_and_settlement_pays_the_winners() {
    let alice = funded(1_000);
    let m = market(&alice);
    let t = Trade {
        outcome: 0,
        side: Side::Buy,
        shares: Micro::units(50),
        max_cost: Some(Micro::units(40)),
        min_proceeds: None,
    };
    let (me, _, q) = trade(&m, &alice, &t, 2_000).unwrap();
    assert!(q.prices_after[0] > 0.5 && q.amount > Micro::units(25) && q.amount < Micro::units(30), "{q:?}");
    let m = Market::replay(Some(m), "m1", &me).unwrap();
    let (_, credits) = resolve(&m, 0, "alice", false, 3_000).unwrap();
    // Alice holds all 50 winning shares and is the creator: she gets the whole pool back.
    assert_eq!(credits["alice"], m.pool);
}
