// One conversation as this tab knows it: the messages, and the last event seq applied.
// Mirrors protocol/transcript.py, plus the seq bookkeeping of the resume guarantee:
// events are applied exactly in seq order; an older one is a repeat and ignored; a newer one
// than the next means a gap, and the caller rejoins with `after` = lastSeq.

// Every change to a message gets a new `rev` from one clock, so the view can tell any change.
let clock = 0;
const tick = () => ++clock;

export class Transcript {
  constructor(id) {
    this.id = id;
    this.meta = null;
    this.messages = [];
    this.lastSeq = null; // null: never joined, so the next join asks for the history
    this.joined = "no"; // no | joining | yes
    this.queued = new Map(); // assistant message id -> queue position
    // call id -> {message_id, tool, arguments, expires_at, state, by, reason}: the tool calls
    // that asked for the user's approval (state "pending" until `approval_resolved`)
    this.approvals = new Map();
    this.live = false; // a user turn arrived live and its reply has not started yet
    this.version = 0; // bumped when messages are replaced wholesale
    this.catchUpTo = 0; // the seq the events that follow `joined` reach
    this.catchUpDeadline = 0;
  }

  /** A reply is on its way (or this tab's turn is: one turn at a time). */
  get generating() {
    return (
      this.queued.size > 0 || this.live || this.messages.some((m) => m.streaming || m.pending)
    );
  }

  find(id) {
    return this.messages.find((m) => m.id === id);
  }

  /** The persisted transcript from `joined` (a first join, or `reset`). */
  load(history, lastSeq) {
    this.messages = history.map((m) => ({ ...m, streaming: false, rev: tick() }));
    this.queued.clear();
    this.approvals.clear();
    this.live = false;
    this.lastSeq = lastSeq;
    this.version += 1;
  }

  /** Apply one conversation event; returns "applied", "repeat" or "gap". */
  apply(event) {
    if (this.lastSeq === null || typeof event.seq !== "number") return "gap";
    if (event.seq <= this.lastSeq) return "repeat";
    if (event.seq !== this.lastSeq + 1) return "gap";
    this.lastSeq = event.seq;
    switch (event.type) {
      case "message":
        this.#put({ ...event.message, streaming: false });
        if (event.message.role === "user") this.live = true;
        break;
      case "start":
        if (event.replaces) this.#remove(event.replaces);
        this.#remove(event.message_id); // a restart: discard the text so far
        this.queued.delete(event.message_id);
        this.live = false;
        this.messages.push({
          id: event.message_id,
          role: "assistant",
          content: "",
          status: "streaming",
          model: event.model,
          streaming: true,
          rev: tick(),
        });
        break;
      case "token": {
        const m = this.find(event.message_id);
        if (m && m.streaming) {
          m.content += event.text;
          if (m.parts && m.parts.at(-1)?.kind !== "text") m.parts.push({ kind: "text", text: "" });
          if (m.parts) m.parts.at(-1).text += event.text;
          m.rev = tick();
        }
        break;
      }
      case "part_start": {
        // A part other than the text (reasoning, say); the text's pieces stay `token`s.
        const m = this.find(event.message_id);
        if (m && m.streaming) {
          m.parts = m.parts || [];
          m.parts[event.index] = { kind: event.kind, text: "", open: true };
          if (event.call_id) m.parts[event.index].call_id = event.call_id;
          if (event.name) m.parts[event.index].name = event.name;
          m.rev = tick();
        }
        break;
      }
      case "part_delta": {
        const part = this.find(event.message_id)?.parts?.[event.index];
        if (part) {
          part.text += event.text;
          this.find(event.message_id).rev = tick();
        }
        break;
      }
      case "part_end": {
        const part = this.find(event.message_id)?.parts?.[event.index];
        if (part) {
          part.open = false;
          if (typeof event.duration_ms === "number") part.duration_ms = event.duration_ms;
          if (event.status) part.status = event.status;
          if (event.approval) part.approval = event.approval;
          this.find(event.message_id).rev = tick();
        }
        break;
      }
      case "done": {
        this.queued.delete(event.message_id);
        this.live = false;
        const m = this.find(event.message_id);
        if (m) {
          m.streaming = false;
          m.status = statusOf(event.reason);
          m.reason = event.reason;
          for (const part of m.parts || []) part.open = false;
          if (event.usage) m.usage = event.usage;
          if (event.error) m.error = event.error;
          m.rev = tick();
        }
        break;
      }
      case "queued":
        this.queued.set(event.message_id, event.position);
        this.live = false;
        break;
      case "error": // the application refused the turn: no reply comes
        this.queued.delete(event.message_id);
        this.live = false;
        break;
      case "updated":
        this.meta = event.meta;
        break;
      case "approval_request":
        this.approvals.set(event.call_id, {
          message_id: event.message_id,
          tool: event.tool,
          arguments: event.arguments,
          expires_at: event.expires_at,
          state: "pending",
        });
        this.#touch(event.message_id);
        break;
      case "approval_resolved": {
        const approval = this.approvals.get(event.call_id);
        if (approval) {
          Object.assign(approval, { state: event.state, by: event.by, reason: event.reason });
          this.#touch(approval.message_id);
        }
        break;
      }
      default:
        break;
    }
    return "applied";
  }

  /** The sending tab shows its own turn at once; the `message` event confirms it. */
  addPending(id, text) {
    if (this.find(id)) return;
    this.messages.push({
      id,
      role: "user",
      content: text,
      status: "sending",
      streaming: false,
      pending: true,
      rev: tick(),
    });
  }

  /** Drop a turn the server refused (only while it is still unconfirmed). */
  dropPending(id) {
    const m = this.find(id);
    if (m && m.pending) this.#remove(id);
  }

  /** The approval of tool call `callId`, if it asked for one. */
  approval(callId) {
    return this.approvals.get(callId);
  }

  /** The message changed outside its own fields (an approval of one of its calls). */
  #touch(id) {
    const m = this.find(id);
    if (m) m.rev = tick();
  }

  #put(message) {
    const index = this.messages.findIndex((m) => m.id === message.id);
    if (index >= 0) {
      this.messages[index] = { ...message, rev: tick() };
    } else {
      this.messages.push({ ...message, rev: tick() });
    }
  }

  #remove(id) {
    const index = this.messages.findIndex((m) => m.id === id);
    if (index >= 0) this.messages.splice(index, 1);
  }
}

export function statusOf(reason) {
  if (reason === "cancelled") return "cancelled";
  if (reason === "error") return "error";
  return "complete";
}
