// The addon's logic, apart from the host so that `npm test` runs it in Node.

/** The reply to `message`, in the chunks it is streamed in: one per word. */
export function replyChunks(message) {
  return `You said: ${message}`.match(/[^ ]* ?/g).filter((chunk) => chunk !== "");
}
