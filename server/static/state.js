// What this tab knows, shared by the modules of the UI.

export const $ = (id) => document.getElementById(id);

export const state = {
  info: null, // GET /api/info
  infoLoading: null,
  token: null,
  user: null,
  conn: null,
  conversations: new Map(), // id -> Conversation meta (the sidebar)
  listChanges: null, // changes seen while the list loads (chat.js loadConversations)
  transcripts: new Map(), // id -> Transcript (conversations this tab has opened)
  active: null, // the conversation on screen
  outbox: new Map(), // message id -> {conversation, text}: turns not yet acknowledged
  model: "",
  simulated: false,
  refreshTimer: null,
  reauthorizing: false,
  failedAuths: 0,
  stick: true, // keep the newest message in view
  rateLimitedUntil: 0,
  everOnline: false,
  dropCode: null, // the close code that ended the last working connection
  onUnauthorized: () => {}, // set by app.js
};

