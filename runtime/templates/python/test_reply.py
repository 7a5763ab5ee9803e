import unittest

from reply import reply_chunks


class ReplyTest(unittest.TestCase):
    def test_the_reply_streams_word_by_word_and_adds_up(self):
        chunks = reply_chunks("where is my order")
        self.assertEqual(len(chunks), 6)
        self.assertEqual("".join(chunks), "You said: where is my order")


if __name__ == "__main__":
    unittest.main()
