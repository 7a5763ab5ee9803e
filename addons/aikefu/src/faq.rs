//! The offline mode: answers from the manifest's FAQ, so the chat is useful with no
//! language model at all.

use crate::settings::FaqEntry;

/// The entry whose keywords best match `question` (most keywords found, then the
/// longest keyword), compared case-insensitively; `None` when none matches.
pub fn answer<'a>(faq: &'a [FaqEntry], question: &str) -> Option<&'a str> {
    let question = question.to_lowercase();
    faq.iter()
        .filter_map(|entry| {
            let hits: Vec<usize> = entry
                .keywords
                .iter()
                .map(|k| k.to_lowercase())
                .filter(|k| !k.is_empty() && question.contains(k.as_str()))
                .map(|k| k.chars().count())
                .collect();
            let longest = hits.iter().copied().max()?;
            Some(((hits.len(), longest), entry.answer.as_str()))
        })
        .max_by_key(|(score, _)| *score)
        .map(|(_, answer)| answer)
}

/// Cuts an answer into chunks of about `size` characters, at character boundaries,
/// the way a model's reply streams in.
pub fn chunks(answer: &str, size: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (count, (index, _)) in answer.char_indices().enumerate() {
        if count > 0 && count % size == 0 {
            out.push(&answer[start..index]);
            start = index;
        }
    }
    if start < answer.len() {
        out.push(&answer[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn faq() -> Vec<FaqEntry> {
        let entry = |keywords: &[&str], answer: &str| FaqEntry {
            keywords: keywords.iter().map(|k| k.to_string()).collect(),
            answer: answer.into(),
        };
        vec![
            entry(&["发货", "shipping", "ship"], "SHIP"),
            entry(&["退货", "退款", "return", "refund"], "RETURN"),
            entry(&["订单", "order status", "order"], "ORDER"),
        ]
    }

    #[test]
    fn chinese_and_english_questions_find_their_answer() {
        let faq = faq();
        assert_eq!(answer(&faq, "什么时候发货？"), Some("SHIP"));
        assert_eq!(answer(&faq, "How long does SHIPPING take?"), Some("SHIP"));
        assert_eq!(answer(&faq, "我想退货退款"), Some("RETURN"));
        assert_eq!(answer(&faq, "where is my order status"), Some("ORDER"));
        assert_eq!(answer(&faq, "你好"), None);
    }

    #[test]
    fn chunks_cover_the_answer_at_character_boundaries() {
        let text = "您好，订单已发货 and on its way";
        let parts = chunks(text, 4);
        assert_eq!(parts.concat(), text);
        assert!(parts.iter().all(|p| p.chars().count() <= 4));
        assert_eq!(chunks("", 4), Vec::<&str>::new());
    }
}
