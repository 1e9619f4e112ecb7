//! Telemetry `accessLogging[].filter.expression`: the part of CEL (Envoy's attribute
//! expressions) that an access-log filter needs, checked once when the config arrives and then
//! evaluated per request without allocating for numbers and booleans.
//!
//! Supported: the attributes in [`Attribute`]; literals (integers, `'strings'`, `true`,
//! `false`, `duration("1.5s")`, lists `[…]`); `!`, `&&`, `||`, `==`, `!=`, `<`, `<=`, `>`,
//! `>=`, `in`; the string methods `startsWith`, `endsWith`, `contains`; parentheses. Types are
//! checked: `response.code > "500"` is an error at config time, not a silent false per request.
//! As in Envoy, an attribute a record does not have (`response.grpc_status` of a plain HTTP
//! request) makes the comparison an error, and an error means "do not log" unless `&&`/`||`
//! decide without it.

use std::{fmt, time::Duration};

use super::Record;

/// A checked expression, ready for [`Filter::matches`].
#[derive(Clone, Debug, PartialEq)]
pub struct Filter {
    root: Expr,
    source: String,
}

/// The request and connection facts an expression can name (Envoy's attribute names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute {
    ResponseCode,
    ResponseGrpcStatus,
    ResponseDuration,
    ResponseSize,
    ResponseHeader(String),
    RequestMethod,
    RequestPath,
    RequestUrlPath,
    RequestHost,
    RequestScheme,
    RequestProtocol,
    RequestId,
    RequestUserAgent,
    RequestSize,
    RequestHeader(String),
    SourceAddress,
    SourcePort,
    DestinationAddress,
    DestinationPort,
    ConnectionMtls,
}

const ATTRIBUTES: &str = "response.code, response.grpc_status, response.duration, response.size, \
     response.headers['name'], request.method, request.path, request.url_path, request.host, \
     request.scheme, request.protocol, request.id, request.useragent, request.size, \
     request.headers['name'], source.address, source.port, destination.address, \
     destination.port, connection.mtls";

impl Attribute {
    fn named(object: &str, field: &str) -> Option<Attribute> {
        Some(match (object, field) {
            ("response", "code") => Attribute::ResponseCode,
            ("response", "grpc_status") => Attribute::ResponseGrpcStatus,
            ("response", "duration") => Attribute::ResponseDuration,
            ("response", "size" | "total_size") => Attribute::ResponseSize,
            ("request", "method") => Attribute::RequestMethod,
            ("request", "path") => Attribute::RequestPath,
            ("request", "url_path") => Attribute::RequestUrlPath,
            ("request", "host") => Attribute::RequestHost,
            ("request", "scheme") => Attribute::RequestScheme,
            ("request", "protocol") => Attribute::RequestProtocol,
            ("request", "id") => Attribute::RequestId,
            ("request", "useragent") => Attribute::RequestUserAgent,
            ("request", "size" | "total_size") => Attribute::RequestSize,
            ("source", "address") => Attribute::SourceAddress,
            ("source", "port") => Attribute::SourcePort,
            ("destination", "address") => Attribute::DestinationAddress,
            ("destination", "port") => Attribute::DestinationPort,
            ("connection", "mtls") => Attribute::ConnectionMtls,
            _ => return None,
        })
    }

    fn kind(&self) -> Type {
        match self {
            Attribute::ResponseCode
            | Attribute::ResponseGrpcStatus
            | Attribute::ResponseSize
            | Attribute::RequestSize
            | Attribute::SourcePort
            | Attribute::DestinationPort => Type::Int,
            Attribute::ResponseDuration => Type::Duration,
            Attribute::ConnectionMtls => Type::Bool,
            _ => Type::Str,
        }
    }

    /// Its value in `record`; `None`: the record has no such fact.
    fn value<'r>(&self, record: &'r Record) -> Option<Value<'r>> {
        let request = record.request.as_ref();
        let int = |n: u64| Some(Value::Int(i64::try_from(n).unwrap_or(i64::MAX)));
        let text = |s: Option<&'r str>| s.map(Value::Str);
        match self {
            Attribute::ResponseCode => request.map(|_| Value::Int(i64::from(record.response_code))),
            Attribute::ResponseGrpcStatus => record.grpc_status.map(|s| Value::Int(i64::from(s))),
            Attribute::ResponseDuration => Some(Value::Duration(record.duration)),
            Attribute::ResponseSize => int(record.bytes_sent),
            Attribute::ResponseHeader(name) => text(record.response_header(name)),
            Attribute::RequestMethod => text(request.map(|r| r.method.as_str())),
            Attribute::RequestPath => text(request.map(|r| r.path.as_str())),
            Attribute::RequestUrlPath => {
                text(request.map(|r| r.path.split_once('?').map_or(r.path.as_str(), |(p, _)| p)))
            }
            Attribute::RequestHost => text(request.map(|r| r.authority.as_str())),
            Attribute::RequestScheme => text(request.map(|_| "http")),
            Attribute::RequestProtocol => text(request.map(|r| r.protocol)),
            Attribute::RequestId => text(record.request_header("x-request-id")),
            Attribute::RequestUserAgent => text(record.request_header("user-agent")),
            Attribute::RequestSize => int(record.bytes_received),
            Attribute::RequestHeader(name) => text(record.request_header(name)),
            Attribute::SourceAddress => record.downstream_remote.map(|a| Value::Ip(a.ip())),
            Attribute::SourcePort => record.downstream_remote.map(|a| Value::Int(i64::from(a.port()))),
            Attribute::DestinationAddress => record.downstream_local.map(|a| Value::Ip(a.ip())),
            Attribute::DestinationPort => record.downstream_local.map(|a| Value::Int(i64::from(a.port()))),
            Attribute::ConnectionMtls => Some(Value::Bool(record.mtls)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Type {
    Int,
    Str,
    Bool,
    Duration,
    List,
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Type::Int => "int",
            Type::Str => "string",
            Type::Bool => "bool",
            Type::Duration => "duration",
            Type::List => "list",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compare {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StrMethod {
    StartsWith,
    EndsWith,
    Contains,
}

#[derive(Clone, Debug, PartialEq)]
enum Literal {
    Int(i64),
    Str(String),
    Bool(bool),
    Duration(Duration),
}

#[derive(Clone, Debug, PartialEq)]
enum Expr {
    Literal(Literal),
    Attribute(Attribute),
    List(Vec<Expr>),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare(Compare, Box<Expr>, Box<Expr>),
    In(Box<Expr>, Box<Expr>),
    Method(StrMethod, Box<Expr>, Box<Expr>),
}

/// A value while evaluating; strings borrow from the record.
#[derive(Clone, Debug)]
enum Value<'r> {
    Int(i64),
    Str(&'r str),
    Bool(bool),
    Duration(Duration),
    Ip(std::net::IpAddr),
}

impl Filter {
    /// Checks `source`; the error says what is wrong and where (a character offset).
    pub fn parse(source: &str) -> Result<Filter, String> {
        let tokens = lex(source)?;
        let mut parser = Parser { tokens, at: 0 };
        let root = parser.or()?;
        if let Some(t) = parser.tokens.get(parser.at) {
            return Err(format!("unexpected `{}` at offset {}", t.text, t.offset));
        }
        match type_of(&root)? {
            Type::Bool => Ok(Filter { root, source: source.to_string() }),
            other => Err(format!("the expression is a {other}, not a bool")),
        }
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether `record` is to be logged: the expression is true (an error is false).
    pub fn matches(&self, record: &Record) -> bool {
        matches!(eval_bool(&self.root, record), Some(true))
    }

    /// The request and response headers the expression reads, for capturing them.
    pub fn headers(&self) -> (Vec<String>, Vec<String>) {
        let (mut request, mut response) = (Vec::new(), Vec::new());
        walk(&self.root, &mut |a| match a {
            Attribute::RequestHeader(n) => request.push(n.clone()),
            Attribute::RequestId => request.push("x-request-id".into()),
            Attribute::RequestUserAgent => request.push("user-agent".into()),
            Attribute::ResponseHeader(n) => response.push(n.clone()),
            _ => {}
        });
        (request, response)
    }
}

fn walk(e: &Expr, f: &mut impl FnMut(&Attribute)) {
    match e {
        Expr::Literal(_) => {}
        Expr::Attribute(a) => f(a),
        Expr::List(items) => items.iter().for_each(|i| walk(i, f)),
        Expr::Not(a) => walk(a, f),
        Expr::And(a, b)
        | Expr::Or(a, b)
        | Expr::Compare(_, a, b)
        | Expr::In(a, b)
        | Expr::Method(_, a, b) => {
            walk(a, f);
            walk(b, f);
        }
    }
}

fn type_of(e: &Expr) -> Result<Type, String> {
    let want = |e: &Expr, t: Type, what: &str| -> Result<(), String> {
        let got = type_of(e)?;
        if got == t { Ok(()) } else { Err(format!("{what} needs a {t}, got a {got}")) }
    };
    Ok(match e {
        Expr::Literal(Literal::Int(_)) => Type::Int,
        Expr::Literal(Literal::Str(_)) => Type::Str,
        Expr::Literal(Literal::Bool(_)) => Type::Bool,
        Expr::Literal(Literal::Duration(_)) => Type::Duration,
        Expr::Attribute(a) => a.kind(),
        Expr::List(items) => {
            let first = items.first().map(type_of).transpose()?;
            for item in items {
                if Some(type_of(item)?) != first {
                    return Err("a list's items must all have one type".into());
                }
            }
            Type::List
        }
        Expr::Not(a) => {
            want(a, Type::Bool, "`!`")?;
            Type::Bool
        }
        Expr::And(a, b) | Expr::Or(a, b) => {
            want(a, Type::Bool, "`&&`/`||`")?;
            want(b, Type::Bool, "`&&`/`||`")?;
            Type::Bool
        }
        Expr::Compare(op, a, b) => {
            let (ta, tb) = (type_of(a)?, type_of(b)?);
            if ta != tb {
                return Err(format!("cannot compare a {ta} with a {tb}"));
            }
            let ordered = !matches!(op, Compare::Eq | Compare::Ne);
            if ordered && !matches!(ta, Type::Int | Type::Duration | Type::Str) || ta == Type::List {
                return Err(format!("a {ta} cannot be ordered"));
            }
            Type::Bool
        }
        Expr::In(item, list) => {
            let Expr::List(items) = list.as_ref() else {
                return Err("`in` needs a list literal on its right, like `[500, 503]`".into());
            };
            let t = type_of(item)?;
            if let Some(other) = items.first().map(type_of).transpose()?.filter(|i| *i != t) {
                return Err(format!("`in`: a {t} cannot be in a list of {other}s"));
            }
            Type::Bool
        }
        Expr::Method(_, target, arg) => {
            want(target, Type::Str, "startsWith/endsWith/contains")?;
            want(arg, Type::Str, "startsWith/endsWith/contains")?;
            Type::Bool
        }
    })
}

fn eval_bool(e: &Expr, record: &Record) -> Option<bool> {
    match e {
        Expr::Not(a) => eval_bool(a, record).map(|v| !v),
        // CEL's commutative && and ||: one side deciding wins over an error on the other.
        Expr::And(a, b) => match (eval_bool(a, record), eval_bool(b, record)) {
            (Some(false), _) | (_, Some(false)) => Some(false),
            (Some(true), Some(true)) => Some(true),
            _ => None,
        },
        Expr::Or(a, b) => match (eval_bool(a, record), eval_bool(b, record)) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        Expr::Compare(op, a, b) => {
            let ordering = compare(&eval(a, record)?, &eval(b, record)?)?;
            Some(match op {
                Compare::Eq => ordering.is_eq(),
                Compare::Ne => ordering.is_ne(),
                Compare::Lt => ordering.is_lt(),
                Compare::Le => ordering.is_le(),
                Compare::Gt => ordering.is_gt(),
                Compare::Ge => ordering.is_ge(),
            })
        }
        Expr::In(item, list) => {
            let item = eval(item, record)?;
            let Expr::List(items) = list.as_ref() else { return None };
            let mut found = false;
            for i in items {
                found |= compare(&item, &eval(i, record)?)?.is_eq();
            }
            Some(found)
        }
        Expr::Method(m, target, arg) => {
            let (Value::Str(t), Value::Str(a)) = (eval(target, record)?, eval(arg, record)?) else {
                return None;
            };
            Some(match m {
                StrMethod::StartsWith => t.starts_with(a),
                StrMethod::EndsWith => t.ends_with(a),
                StrMethod::Contains => t.contains(a),
            })
        }
        Expr::Literal(Literal::Bool(b)) => Some(*b),
        Expr::Attribute(a) => match a.value(record)? {
            Value::Bool(b) => Some(b),
            _ => None,
        },
        Expr::Literal(_) | Expr::List(_) => None,
    }
}

fn eval<'r>(e: &'r Expr, record: &'r Record) -> Option<Value<'r>> {
    match e {
        Expr::Literal(Literal::Int(n)) => Some(Value::Int(*n)),
        Expr::Literal(Literal::Str(s)) => Some(Value::Str(s)),
        Expr::Literal(Literal::Bool(b)) => Some(Value::Bool(*b)),
        Expr::Literal(Literal::Duration(d)) => Some(Value::Duration(*d)),
        Expr::Attribute(a) => a.value(record),
        Expr::List(_) => None,
        _ => eval_bool(e, record).map(Value::Bool),
    }
}

fn compare(a: &Value<'_>, b: &Value<'_>) -> Option<std::cmp::Ordering> {
    Some(match (a, b) {
        (Value::Int(a), Value::Int(b)) => a.cmp(b),
        (Value::Str(a), Value::Str(b)) => a.cmp(b),
        (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
        (Value::Duration(a), Value::Duration(b)) => a.cmp(b),
        // Addresses are strings in CEL; compare the way they print.
        (Value::Ip(a), Value::Str(b)) => a.to_string().as_str().cmp(b),
        (Value::Str(a), Value::Ip(b)) => (*a).cmp(b.to_string().as_str()),
        _ => return None,
    })
}

#[derive(Clone, Debug, PartialEq)]
enum TokenKind {
    Ident,
    Int(i64),
    Str(String),
    Punct,
}

#[derive(Clone, Debug)]
struct Token {
    kind: TokenKind,
    text: String,
    offset: usize,
}

fn lex(source: &str) -> Result<Vec<Token>, String> {
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let kind = if c.is_ascii_alphabetic() || c == b'_' {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            TokenKind::Ident
        } else if c.is_ascii_digit() {
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let n = source[start..i].parse().map_err(|_| format!("number too large at offset {start}"))?;
            // CEL's unsigned literal: the same number here.
            if bytes.get(i) == Some(&b'u') {
                i += 1;
            }
            TokenKind::Int(n)
        } else if c == b'"' || c == b'\'' {
            i += 1;
            let mut text = String::new();
            loop {
                match bytes.get(i) {
                    None => return Err(format!("unterminated string starting at offset {start}")),
                    Some(&q) if q == c => break,
                    Some(b'\\') => {
                        let escaped = source[i + 1..].chars().next();
                        let Some(e) = escaped else { return Err(format!("bad escape at offset {i}")) };
                        text.push(match e {
                            'n' => '\n',
                            't' => '\t',
                            other => other,
                        });
                        i += 1 + e.len_utf8();
                    }
                    Some(_) => {
                        let ch = source[i..].chars().next().expect("in bounds");
                        text.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            i += 1;
            TokenKind::Str(text)
        } else {
            let two = source.get(i..i + 2).unwrap_or("");
            if ["&&", "||", "==", "!=", "<=", ">="].contains(&two) {
                i += 2;
            } else if b"!<>()[].,-".contains(&c) {
                i += 1;
            } else {
                let ch = source[i..].chars().next().expect("in bounds");
                return Err(format!("unexpected `{ch}` at offset {i}"));
            }
            TokenKind::Punct
        };
        tokens.push(Token { kind, text: source[start..i].to_string(), offset: start });
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&str> {
        self.tokens.get(self.at).map(|t| t.text.as_str())
    }

    fn eat(&mut self, text: &str) -> bool {
        let hit = self.peek() == Some(text) && self.tokens[self.at].kind == TokenKind::Punct;
        if hit {
            self.at += 1;
        }
        hit
    }

    fn expect(&mut self, text: &str) -> Result<(), String> {
        if self.eat(text) {
            return Ok(());
        }
        Err(match self.tokens.get(self.at) {
            Some(t) => format!("expected `{text}` at offset {}, found `{}`", t.offset, t.text),
            None => format!("expected `{text}` at the end"),
        })
    }

    fn next(&mut self) -> Result<Token, String> {
        let t = self.tokens.get(self.at).cloned().ok_or("the expression ends too early")?;
        self.at += 1;
        Ok(t)
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.relation()?;
        while self.eat("&&") {
            left = Expr::And(Box::new(left), Box::new(self.relation()?));
        }
        Ok(left)
    }

    fn relation(&mut self) -> Result<Expr, String> {
        let left = self.unary()?;
        let op = match self.peek() {
            Some("==") => Compare::Eq,
            Some("!=") => Compare::Ne,
            Some("<") => Compare::Lt,
            Some("<=") => Compare::Le,
            Some(">") => Compare::Gt,
            Some(">=") => Compare::Ge,
            Some("in") => {
                self.at += 1;
                return Ok(Expr::In(Box::new(left), Box::new(self.unary()?)));
            }
            _ => return Ok(left),
        };
        self.at += 1;
        Ok(Expr::Compare(op, Box::new(left), Box::new(self.unary()?)))
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat("!") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.eat("-") {
            return match self.next()?.kind {
                TokenKind::Int(n) => Ok(Expr::Literal(Literal::Int(-n))),
                _ => Err("`-` only negates a number literal".into()),
            };
        }
        self.member()
    }

    fn member(&mut self) -> Result<Expr, String> {
        let mut e = self.primary()?;
        loop {
            if self.eat(".") {
                let name = self.next()?;
                let method = match name.text.as_str() {
                    "startsWith" => StrMethod::StartsWith,
                    "endsWith" => StrMethod::EndsWith,
                    "contains" => StrMethod::Contains,
                    other => {
                        return Err(format!(
                            "unknown method or attribute `.{other}` at offset {}; supported attributes: \
                             {ATTRIBUTES}; methods: startsWith, endsWith, contains",
                            name.offset
                        ));
                    }
                };
                self.expect("(")?;
                let arg = self.or()?;
                self.expect(")")?;
                e = Expr::Method(method, Box::new(e), Box::new(arg));
            } else {
                return Ok(e);
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let t = self.next()?;
        match t.kind {
            TokenKind::Int(n) => Ok(Expr::Literal(Literal::Int(n))),
            TokenKind::Str(s) => Ok(Expr::Literal(Literal::Str(s))),
            TokenKind::Punct if t.text == "(" => {
                let e = self.or()?;
                self.expect(")")?;
                Ok(e)
            }
            TokenKind::Punct if t.text == "[" => {
                let mut items = Vec::new();
                if !self.eat("]") {
                    loop {
                        items.push(self.or()?);
                        if self.eat("]") {
                            break;
                        }
                        self.expect(",")?;
                    }
                }
                Ok(Expr::List(items))
            }
            TokenKind::Punct => Err(format!("unexpected `{}` at offset {}", t.text, t.offset)),
            TokenKind::Ident => self.named(t),
        }
    }

    /// `true`, `false`, `duration("…")` or an attribute (`object.field`, `object.headers['h']`).
    fn named(&mut self, t: Token) -> Result<Expr, String> {
        match t.text.as_str() {
            "true" => return Ok(Expr::Literal(Literal::Bool(true))),
            "false" => return Ok(Expr::Literal(Literal::Bool(false))),
            "duration" => {
                self.expect("(")?;
                let arg = self.next()?;
                let TokenKind::Str(text) = arg.kind else {
                    return Err(format!("duration() takes a string like \"1.5s\" (offset {})", arg.offset));
                };
                self.expect(")")?;
                return parse_duration(&text).map(|d| Expr::Literal(Literal::Duration(d))).ok_or_else(|| {
                    format!("duration(\"{text}\"): not a duration like \"250ms\" or \"1.5s\"")
                });
            }
            _ => {}
        }
        let unknown = |what: &str| {
            format!("unknown attribute `{what}` at offset {}; supported: {ATTRIBUTES}", t.offset)
        };
        self.expect(".").map_err(|_| unknown(&t.text))?;
        let field = self.next()?;
        if field.text == "headers" && matches!(t.text.as_str(), "request" | "response") {
            self.expect("[")?;
            let TokenKind::Str(name) = self.next()?.kind else {
                return Err(format!("{}.headers[…] takes a quoted header name", t.text));
            };
            self.expect("]")?;
            let name = name.to_ascii_lowercase();
            return Ok(Expr::Attribute(if t.text == "request" {
                Attribute::RequestHeader(name)
            } else {
                Attribute::ResponseHeader(name)
            }));
        }
        Attribute::named(&t.text, &field.text)
            .map(Expr::Attribute)
            .ok_or_else(|| unknown(&format!("{}.{}", t.text, field.text)))
    }
}

/// CEL's duration strings: a sequence of `<number><unit>` (h, m, s, ms, us, ns).
fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(number * seconds).ok()?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::{Record, RequestFacts};

    fn record(code: u16, ms: u64) -> Record {
        Record {
            duration: Duration::from_millis(ms),
            response_code: code,
            request: Some(RequestFacts {
                method: "GET".into(),
                path: "/api/items?x=1".into(),
                protocol: "HTTP/1.1",
                authority: "shop:80".into(),
                headers: vec![("x-debug".into(), "on".into())],
            }),
            ..Record::default()
        }
    }

    #[test]
    fn response_code_and_duration() {
        let f = Filter::parse("response.code >= 400").unwrap();
        assert!(f.matches(&record(503, 1)));
        assert!(!f.matches(&record(200, 1)));
        let f = Filter::parse("response.duration > duration(\"500ms\") || response.code == 418").unwrap();
        assert!(f.matches(&record(200, 900)));
        assert!(f.matches(&record(418, 1)));
        assert!(!f.matches(&record(200, 100)));
        let f = Filter::parse("response.code in [500, 503] && !(request.method == 'POST')").unwrap();
        assert!(f.matches(&record(503, 1)));
        assert!(!f.matches(&record(404, 1)));
    }

    #[test]
    fn strings_headers_and_missing_facts() {
        let f = Filter::parse("request.url_path.startsWith('/api') && request.headers['X-Debug'] == 'on'")
            .unwrap();
        assert!(f.matches(&record(200, 1)));
        // A plain HTTP answer has no gRPC status: the comparison is an error, not logged...
        let f = Filter::parse("response.grpc_status != 0").unwrap();
        assert!(!f.matches(&record(200, 1)));
        // ...unless `||` decides without it.
        let f = Filter::parse("response.grpc_status != 0 || response.code == 200").unwrap();
        assert!(f.matches(&record(200, 1)));
        let tcp = Record { request: None, ..record(0, 1) };
        assert!(!Filter::parse("response.code >= 0").unwrap().matches(&tcp));
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let err = |s: &str| Filter::parse(s).unwrap_err();
        assert!(
            err("response.status >= 400").contains("unknown attribute `response.status`"),
            "{}",
            err("response.status >= 400")
        );
        assert!(err("response.code > '500'").contains("cannot compare a int with a string"));
        assert!(err("response.code").contains("not a bool"));
        assert!(err("response.code >= 400 &&").contains("ends too early"));
        assert!(err("response.duration > duration('soon')").contains("not a duration"));
        assert!(err("response.code @ 1").contains("unexpected `@` at offset 14"));
        assert!(err("'abc").contains("unterminated string"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), None);
    }
}
