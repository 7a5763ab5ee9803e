import assert from "node:assert/strict";
import { test } from "node:test";

import { replyChunks } from "../src/reply.js";

test("the reply streams word by word and adds up", () => {
  const chunks = replyChunks("where is my order");
  assert.equal(chunks.length, 6);
  assert.equal(chunks.join(""), "You said: where is my order");
});
