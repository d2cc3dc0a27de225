//! The Lua scripts of the fenced operations, written from the
//! [envelope](super::envelope) layout so that the two cannot drift apart.
//!
//! `complete`, `release` and `renew` must compare the token before they
//! write, so each is one script. They write with `PSETEX`, never `SET`, so
//! server statistics tell them apart from `begin`'s plain `SET … NX GET`.

use std::sync::LazyLock;

use redis::Script;

use super::envelope::{
    CLAIMED, COMPLETED, CURRENT_VERSION, FINGERPRINT, HEADER, STATE, TOKEN, VERSION, lua_sub,
};

/// The scripts, loaded once per process.
pub(crate) struct Scripts {
    /// `KEYS[1]` the record; `ARGV` token, encoded record, TTL in ms, the
    /// completion time (8 bytes). Answers 1 stored, 0 lost.
    pub(crate) complete: Script,
    /// `KEYS[1]` the record; `ARGV` token. Deletes a claim that is ours.
    pub(crate) release: Script,
    /// `KEYS[1]` the record; `ARGV` token, lease in ms, new deadline (8
    /// bytes); what follows the header (when the claim was made) is kept.
    /// Answers 1 renewed, 0 not ours.
    pub(crate) renew: Script,
    /// `KEYS[1]` the record. Answers its value and `PTTL`: one command, so
    /// that a cluster client follows a migrating slot's `ASK` for it (a
    /// pipeline of `GET` and `PTTL` does not).
    pub(crate) read: Script,
    /// `KEYS[1]` the record, `KEYS[2]` its step journal (a hash in the same
    /// slot); `ARGV` token, step name, value, TTL in ms. A new name is
    /// stored as its 8-digit position followed by the value; a name already
    /// there keeps its value. The journal is kept for at least the TTL.
    /// Answers 1 journaled, 0 not ours.
    pub(crate) append_step: Script,
    /// `KEYS[1]` the record, `KEYS[2]` the key's last fencing epoch (in
    /// the same slot, in decimal); `ARGV` token, TTL in ms. Answers a new
    /// epoch, or -1 when the claim is not ours: the server's time in µs, or
    /// one more than the key's last epoch if that is larger, so increasing
    /// while the last is remembered, and after it expired unless the
    /// server's clock went back.
    pub(crate) epoch: Script,
    /// `KEYS[1]` the record, `KEYS[2]` its step journal. Deletes both;
    /// answers 1 when there was a record or a claim (a journal alone
    /// answers 0), in one step.
    pub(crate) forget: Script,
}

pub(crate) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| {
    let ours = |state: u8| {
        format!(
            "held and string.byte(held, {version}) == {current} \
             and string.byte(held, {state_at}) == {state} \
             and string.sub(held, {token}) == ARGV[1]",
            version = VERSION + 1,
            current = CURRENT_VERSION,
            state_at = STATE + 1,
            token = lua_sub(&TOKEN),
        )
    };
    let prefix = |state: u8| {
        format!(
            "string.char({CURRENT_VERSION}, {state}) .. string.sub(held, {})",
            lua_sub(&(TOKEN.start..FINGERPRINT.end))
        )
    };
    Scripts {
        read: Script::new("return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}"),
        forget: Script::new(
            "local found = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
return found",
        ),
        complete: Script::new(&format!(
            "local held = redis.call('GET', KEYS[1])
if {completed} then
  return 1
end
if not ({claimed}) then
  return 0
end
redis.call('PSETEX', KEYS[1], ARGV[3], {prefix} .. ARGV[4] .. ARGV[2])
return 1",
            completed = ours(COMPLETED),
            claimed = ours(CLAIMED),
            prefix = prefix(COMPLETED),
        )),
        release: Script::new(&format!(
            "local held = redis.call('GET', KEYS[1])
if {claimed} then
  redis.call('DEL', KEYS[1])
end
return 0",
            claimed = ours(CLAIMED),
        )),
        renew: Script::new(&format!(
            "local held = redis.call('GET', KEYS[1])
if {claimed} then
  redis.call('PSETEX', KEYS[1], ARGV[2], {prefix} .. ARGV[3] .. string.sub(held, {after}))
  return 1
end
return 0",
            claimed = ours(CLAIMED),
            prefix = prefix(CLAIMED),
            after = HEADER + 1,
        )),
        append_step: Script::new(&format!(
            "local held = redis.call('GET', KEYS[1])
if not ({claimed}) then
  return 0
end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then
  local position = redis.call('HLEN', KEYS[2])
  redis.call('HSET', KEYS[2], ARGV[2], string.format('%08d', position) .. ARGV[3])
end
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return 1",
            claimed = ours(CLAIMED),
        )),
        epoch: Script::new(&format!(
            "local held = redis.call('GET', KEYS[1])
if not ({claimed}) then
  return -1
end
local last = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
local time = redis.call('TIME')
local epoch = math.max(tonumber(time[1]) * 1000000 + tonumber(time[2]), last + 1)
local text = string.format('%.0f', epoch)
redis.call('PSETEX', KEYS[2], ARGV[2], text)
return tonumber(text)",
            claimed = ours(CLAIMED),
        )),
    }
});
