//! proptest strategies for every frame kind, shared by the codec's test files.

use bytes::Bytes;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use supermachine_codec::{
    kind, AgentError, ControlAck, ControlAction, ControlMessage, ErrorCode, ExecRequest, ExitInfo,
    Frame, StagedFile, StdioMode, WindowSize,
};

pub fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn stdio() -> impl Strategy<Value = StdioMode> {
    prop_oneof![Just(StdioMode::Piped), Just(StdioMode::Null)]
}

fn argv() -> impl Strategy<Value = Vec<String>> {
    vec(".{0,12}", 1..4)
}

fn staged_file() -> impl Strategy<Value = StagedFile> {
    ("/[a-z/]{1,16}", bytes(300), option::of(0u32..0o7777)).prop_map(|(path, contents, mode)| {
        let file = StagedFile::new(path, contents);
        match mode {
            Some(mode) => file.with_mode(mode),
            None => file,
        }
    })
}

pub fn request() -> impl Strategy<Value = ExecRequest> {
    (
        (argv(), btree_map(".{0,8}", ".{0,8}", 0..4)),
        (option::of(".{0,10}"), option::of(".{0,10}"), any::<bool>()),
        (option::of(any::<u16>()), option::of(any::<u16>())),
        (stdio(), stdio(), stdio()),
        (vec(staged_file(), 0..3), vec(argv(), 0..3)),
    )
        .prop_map(
            |((argv, env), (cwd, user, tty), (cols, rows), (i, o, e), (files, chain))| {
                let mut request = ExecRequest::new(argv);
                request.env = env;
                request.cwd = cwd;
                request.user = user;
                request.tty = tty;
                request.cols = cols;
                request.rows = rows;
                request.stdin = i;
                request.stdout = o;
                request.stderr = e;
                request.stage_files = files;
                request.chain = chain;
                request
            },
        )
}

fn action() -> impl Strategy<Value = ControlAction> {
    prop_oneof![
        Just(ControlAction::Ping),
        ".{0,20}".prop_map(|path| ControlAction::ReadFile { path }),
        (".{0,20}", option::of(any::<u32>()))
            .prop_map(|(path, mode)| ControlAction::WriteFile { path, mode }),
        any::<i32>().prop_map(|signal| ControlAction::SignalWorkload { signal }),
        any::<u64>().prop_map(|unix_nanos| ControlAction::SetClock { unix_nanos }),
        Just(ControlAction::ReseedRng),
    ]
}

fn ack() -> impl Strategy<Value = ControlAck> {
    (
        any::<bool>(),
        option::of(".{0,20}"),
        option::of(".{0,8}"),
        option::of("[0-9a-f-]{0,36}"),
    )
        .prop_map(|(ok, error, version, boot_id)| ControlAck {
            ok,
            error,
            version,
            boot_id,
        })
}

const KNOWN_ACTIONS: &[&str] = &[
    "ping",
    "read_file",
    "write_file",
    "signal_workload",
    "set_clock",
    "reseed_rng",
];

fn control() -> impl Strategy<Value = ControlMessage> {
    prop_oneof![
        action().prop_map(ControlMessage::Action),
        "[a-z_]{1,16}"
            .prop_filter("must not be a known action", |n| !KNOWN_ACTIONS
                .contains(&n.as_str()))
            .prop_map(ControlMessage::UnknownAction),
        ack().prop_map(ControlMessage::Ack),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::NotFound),
        Just(ErrorCode::PermissionDenied),
        Just(ErrorCode::InvalidRequest),
        Just(ErrorCode::SpawnFailed),
        Just(ErrorCode::Internal),
        Just(ErrorCode::Other),
    ]
}

/// Any frame the encoder accepts.
pub fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        request().prop_map(Frame::Request),
        (control(), bytes(300)).prop_map(|(message, data)| Frame::Control { message, data }),
        bytes(2000).prop_map(Frame::Stdin),
        bytes(2000).prop_map(Frame::Stdout),
        bytes(2000).prop_map(Frame::Stderr),
        (any::<u16>(), any::<u16>())
            .prop_map(|(cols, rows)| Frame::Resize(WindowSize { cols, rows })),
        any::<u32>().prop_map(Frame::Signal),
        any::<u32>().prop_map(|pid| Frame::Started { pid }),
        (any::<u32>(), option::of(any::<u64>()))
            .prop_map(|(code, peak_rss_kib)| Frame::Exit(ExitInfo { code, peak_rss_kib })),
        (error_code(), ".{0,40}")
            .prop_map(|(code, message)| Frame::Error(AgentError::new(code, message))),
        (
            any::<u8>().prop_filter("unknown kinds only", |k| !kind::is_known(*k)),
            bytes(100)
        )
            .prop_map(|(kind, payload)| Frame::Unknown { kind, payload }),
    ]
}
