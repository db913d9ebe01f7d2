use super::*;
use simple_dns::Question;

fn query(name: &str) -> Vec<u8> {
    let mut packet = Packet::new_query(7);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    packet.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(TYPE::A),
        simple_dns::QCLASS::CLASS(CLASS::IN),
        false,
    ));
    packet.build_bytes_vec().unwrap()
}

#[test]
fn the_host_loopback_name_is_answered_here() {
    let Handling::Answer(answer) = handle(&query("Host.Supermachine.Internal."), true) else {
        panic!("not answered locally")
    };
    let answer = Packet::parse(&answer).unwrap();
    assert_eq!(answer.id(), 7);
    assert_eq!(answer.rcode(), RCODE::NoError);
    assert!(
        matches!(&answer.answers[0].rdata, RData::A(a) if Ipv4Addr::from(a.address) == HOST_LOOPBACK)
    );

    let Handling::Answer(answer) = handle(&query(HOST_LOOPBACK_NAME), false) else {
        panic!("not answered locally")
    };
    let answer = Packet::parse(&answer).unwrap();
    assert_eq!(answer.rcode(), RCODE::NameError);
    assert!(answer.answers.is_empty());
}

#[test]
fn other_names_go_upstream_and_garbage_is_dropped() {
    assert_eq!(handle(&query("example.test"), true), Handling::Forward);
    assert_eq!(handle(b"\x00\x01garbage", true), Handling::Drop);
}

#[test]
fn answers_record_the_question_and_record_names() {
    let mut answer = Packet::new_reply(7);
    answer.questions.push(Question::new(
        Name::new_unchecked("www.allowed.test"),
        QTYPE::TYPE(TYPE::A),
        simple_dns::QCLASS::CLASS(CLASS::IN),
        false,
    ));
    answer.answers.push(ResourceRecord::new(
        Name::new_unchecked("cdn.example.test"),
        CLASS::IN,
        60,
        RData::A(A::from(Ipv4Addr::new(203, 0, 113, 9))),
    ));
    let table = Mutex::new(NameTable::default());
    record(&answer.build_bytes_vec().unwrap(), &table);
    let names = table.lock().unwrap().names("203.0.113.9".parse().unwrap());
    assert_eq!(names, ["cdn.example.test", "www.allowed.test"]);
}

#[tokio::test]
async fn no_upstream_is_servfail() {
    let answer = forward(&query("example.test"), &[], Duration::from_millis(10))
        .await
        .unwrap();
    assert_eq!(
        Packet::parse(&answer).unwrap().rcode(),
        RCODE::ServerFailure
    );
}
