//! How far the estimate is from a real tokenizer: OpenAI's `o200k_base`
//! (GPT-4o, GPT-4.1, o-series; bundled with `tiktoken-rs`, no network) on a
//! corpus of English prose, code, JSON and other languages, and on the
//! OpenAI fixtures' prompts; Anthropic's fixtures against their recorded
//! usage (synthesised, see tests/fixtures/README.md). A report, not a
//! bound: it is ignored by default and printed with
//!
//! ```text
//! cargo test --release -p tollgate-core --lib accuracy -- --ignored --nocapture
//! ```
//!
//! The figures are in docs/metering.md.
#![allow(clippy::unwrap_used)]

use super::inspect;
use super::text::text_tokens;
use crate::route::Route;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tiktoken_rs::CoreBPE;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// One paragraph per language, written for this report: what Tollgate does,
/// in the words a user of it would write.
const LANGUAGES: &[(&str, &str)] = &[
    ("German", "Die Ratenbegrenzung schützt gemeinsam genutzte Dienste vor Überlastung. Jeder Schlüssel erhält ein Kontingent an Anfragen und Tokens pro Minute; wenn es aufgebraucht ist, antwortet das Gateway mit dem Status 429 und nennt die Wartezeit. Budgets werden täglich zurückgesetzt, und jede Anfrage wird mit Modell, Kosten und Latenz protokolliert. Administratoren können Schlüssel widerrufen, ohne den Proxy neu zu starten."),
    ("French", "La limitation de débit protège les services partagés contre la surcharge. Chaque clé reçoit un quota de requêtes et de jetons par minute ; lorsqu'il est épuisé, la passerelle répond avec le statut 429 et indique le délai d'attente. Les budgets sont réinitialisés chaque jour, et chaque requête est journalisée avec son modèle, son coût et sa latence. Les administrateurs peuvent révoquer une clé sans redémarrer le proxy."),
    ("Spanish", "La limitación de velocidad protege los servicios compartidos de la sobrecarga. Cada clave recibe una cuota de solicitudes y de tokens por minuto; cuando se agota, la pasarela responde con el estado 429 e indica el tiempo de espera. Los presupuestos se restablecen cada día y cada solicitud se registra con su modelo, su coste y su latencia. Los administradores pueden revocar una clave sin reiniciar el proxy."),
    ("Russian", "Ограничение скорости защищает общие сервисы от перегрузки. Каждый ключ получает квоту запросов и токенов в минуту; когда она исчерпана, шлюз отвечает статусом 429 и сообщает время ожидания. Бюджеты сбрасываются ежедневно, а каждый запрос записывается в журнал с моделью, стоимостью и задержкой. Администраторы могут отозвать ключ без перезапуска прокси."),
    ("Chinese", "速率限制可以保护共享服务免受过载。每个密钥每分钟都有请求和令牌的配额；配额用尽时，网关返回状态码429并告知需要等待的时间。预算每天重置，每个请求都会记录其模型、成本和延迟。管理员可以在不重启代理的情况下撤销密钥。"),
    ("Japanese", "レート制限は共有サービスを過負荷から守ります。各キーには1分あたりのリクエスト数とトークン数の割り当てがあり、使い切るとゲートウェイはステータス429を返し、待ち時間を知らせます。予算は毎日リセットされ、各リクエストはモデル、コスト、レイテンシとともに記録されます。管理者はプロキシを再起動せずにキーを取り消せます。"),
    ("Korean", "속도 제한은 공유 서비스를 과부하로부터 보호합니다. 각 키에는 분당 요청 수와 토큰 수의 할당량이 있으며, 이를 모두 사용하면 게이트웨이는 상태 코드 429로 응답하고 대기 시간을 알려 줍니다. 예산은 매일 초기화되며 모든 요청은 모델, 비용, 지연 시간과 함께 기록됩니다. 관리자는 프록시를 다시 시작하지 않고도 키를 취소할 수 있습니다."),
    ("Arabic", "يحمي تحديد المعدل الخدمات المشتركة من الحمل الزائد. يحصل كل مفتاح على حصة من الطلبات والرموز في الدقيقة؛ وعند نفادها تستجيب البوابة بالحالة 429 وتذكر مدة الانتظار. تُعاد تعيين الميزانيات يوميًا، ويُسجَّل كل طلب مع النموذج والتكلفة وزمن الاستجابة. يمكن للمسؤولين إلغاء مفتاح دون إعادة تشغيل الوكيل."),
    ("Hindi", "दर सीमा साझा सेवाओं को अधिक भार से बचाती है। हर कुंजी को प्रति मिनट अनुरोधों और टोकनों का कोटा मिलता है; जब यह समाप्त हो जाता है, तो गेटवे स्थिति 429 के साथ जवाब देता है और प्रतीक्षा का समय बताता है। बजट हर दिन रीसेट होते हैं, और हर अनुरोध मॉडल, लागत और विलंब के साथ दर्ज किया जाता है।"),
];

fn files(dir: &Path, ext: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if ext.iter().any(|x| p.extension().is_some_and(|e| e == *x)) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Paragraphs of the Markdown docs that are prose: no tables, headings,
/// lists of commands or code blocks; each with where it is from.
fn prose() -> Vec<(String, String)> {
    let mut docs = files(&Path::new(ROOT).join("docs"), &["md"]);
    docs.push(Path::new(ROOT).join("README.md"));
    let mut out = Vec::new();
    for d in docs {
        let text = read(&d);
        let mut in_code = false;
        for para in text.split("\n\n") {
            let fences = para.matches("```").count();
            let was = in_code;
            in_code ^= fences % 2 == 1;
            if was || fences > 0 {
                continue;
            }
            let first = para.trim_start();
            if first.starts_with(['|', '#', '-', '*', '>', '`', '1', '<']) || para.len() < 200 {
                continue;
            }
            out.push((name(&d), para.to_string()));
        }
    }
    out
}

/// The project's own Rust, Python and shell, in 60-line pieces.
fn code() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut sources = files(&Path::new(ROOT).join("core/src"), &["rs"]);
    sources.extend(files(
        &Path::new(ROOT).join("scripts"),
        &["py", "sh", "mjs"],
    ));
    // Not this file: its paragraphs in other languages are measured apart.
    for f in sources
        .into_iter()
        .filter(|f| !f.ends_with("estimate/accuracy.rs"))
    {
        let text = read(&f);
        let lines: Vec<&str> = text.lines().collect();
        out.extend(lines.chunks(60).map(|c| (name(&f), c.join("\n"))));
    }
    out
}

/// The recorded exchanges and example policies, whole files.
fn json() -> Vec<(String, String)> {
    let mut f = files(&Path::new(ROOT).join("tests/fixtures"), &["json"]);
    f.extend(files(&Path::new(ROOT).join("policies"), &["json"]));
    f.iter().map(|p| (name(p), read(p))).collect()
}

/// A file's path from the repository root.
fn name(p: &Path) -> String {
    let root = Path::new(ROOT).canonicalize().unwrap_or_default();
    let p = p.canonicalize().unwrap_or_default();
    p.strip_prefix(&root).unwrap_or(&p).display().to_string()
}

/// Mean |error| per sample, the worst one, and the error of the totals.
struct Report {
    errors: Vec<f64>,
    /// The sample with the largest error.
    worst: String,
    estimate: u64,
    actual: u64,
}

impl Report {
    fn new() -> Report {
        Report {
            errors: Vec::new(),
            worst: String::new(),
            estimate: 0,
            actual: 0,
        }
    }

    fn add(&mut self, estimate: u64, actual: u64, name: &str) {
        if actual == 0 {
            return;
        }
        let e = (estimate as f64 - actual as f64) / actual as f64;
        if self.errors.iter().all(|w| w.abs() < e.abs()) {
            self.worst = name.to_string();
        }
        self.errors.push(e);
        self.estimate += estimate;
        self.actual += actual;
    }

    fn print(&self, name: &str) {
        let mean =
            self.errors.iter().map(|e| e.abs()).sum::<f64>() / self.errors.len().max(1) as f64;
        let worst = self
            .errors
            .iter()
            .fold(0.0_f64, |w, e| if e.abs() > w.abs() { *e } else { w });
        let total = self.estimate as f64 / self.actual.max(1) as f64 - 1.0;
        println!(
            "| {name} | {} | {} | {} | {:.1}% | {:+.1}% ({}) | {:+.1}% |",
            self.errors.len(),
            self.actual,
            self.estimate,
            mean * 100.0,
            worst * 100.0,
            self.worst,
            total * 100.0
        );
    }
}

fn o200k() -> CoreBPE {
    tiktoken_rs::o200k_base().unwrap()
}

fn count(bpe: &CoreBPE, s: &str) -> u64 {
    bpe.encode_ordinary(s).len() as u64
}

/// A chat prompt as OpenAI counts it (its cookbook's `num_tokens_from_messages`
/// for GPT-4o): 3 per message plus its role and content, 3 to prime the reply.
fn openai_prompt(bpe: &CoreBPE, route: Route, req: &Value) -> u64 {
    let message = |role: &str, content: &str| 3 + count(bpe, role) + count(bpe, content);
    let mut n = 3;
    if let Some(i) = req["instructions"].as_str() {
        n += message("system", i);
    }
    match (route, &req["input"], &req["messages"]) {
        (Route::OpenAiResponses, Value::String(s), _) => n += message("user", s),
        (_, _, Value::Array(messages)) => {
            for m in messages {
                n += message(
                    m["role"].as_str().unwrap_or(""),
                    m["content"].as_str().unwrap_or(""),
                );
            }
        }
        _ => {}
    }
    n
}

#[test]
#[ignore = "a report: run with --ignored --nocapture (docs/metering.md)"]
fn accuracy_against_o200k_and_the_recorded_exchanges() {
    let bpe = o200k();
    println!("\nText rule against o200k_base (OpenAI):\n");
    println!("| corpus | samples | o200k tokens | estimate | mean abs error | worst | error of the total |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, samples) in [
        ("English prose (docs/*.md)", prose()),
        ("code (core/src, scripts)", code()),
        ("JSON (fixtures, policies)", json()),
    ] {
        let mut r = Report::new();
        for (from, s) in &samples {
            r.add(text_tokens(s), count(&bpe, s), from);
        }
        r.print(name);
    }
    let mut all = Report::new();
    for (lang, text) in LANGUAGES {
        let mut r = Report::new();
        r.add(text_tokens(text), count(&bpe, text), lang);
        all.add(text_tokens(text), count(&bpe, text), lang);
        r.print(lang);
    }
    all.print("all other languages");

    println!("\nWhole requests:\n");
    println!("| exchanges | samples | reference tokens | estimate | mean abs error | worst | error of the total |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let manifest: Vec<Value> = serde_json::from_str(&read(
        &Path::new(ROOT).join("tests/fixtures/exchanges.json"),
    ))
    .unwrap();
    let mut openai = Report::new();
    let mut openai_recorded = Report::new();
    let mut anthropic = Report::new();
    for ex in &manifest {
        let path = ex["route"].as_str().unwrap_or("");
        let Ok(target) =
            Route::classify(b"POST", path.as_bytes(), crate::route::Provider::Anthropic)
        else {
            continue;
        };
        let route = target.route;
        let body = read(
            &Path::new(ROOT)
                .join("tests/fixtures")
                .join(ex["request"].as_str().unwrap_or("")),
        );
        let Ok(info) = inspect(route, body.as_bytes()) else {
            continue;
        };
        let recorded = ex["usage"].as_object().map(|u| {
            ["input", "cache_write", "cache_read"]
                .iter()
                .map(|k| u[*k].as_u64().unwrap_or(0))
                .sum::<u64>()
        });
        match route {
            Route::OpenAiChat | Route::OpenAiResponses => {
                let req: Value = serde_json::from_str(&body).unwrap();
                let actual = openai_prompt(&bpe, route, &req);
                println!(
                    "  {:<24} o200k {actual:>5}  recorded {:>5}  estimate {:>5}",
                    ex["name"].as_str().unwrap_or(""),
                    recorded.unwrap_or(0),
                    info.input_estimate
                );
                let name = ex["name"].as_str().unwrap_or("");
                openai.add(info.input_estimate, actual, name);
                if let Some(r) = recorded {
                    openai_recorded.add(info.input_estimate, r, name);
                }
            }
            _ => {
                if let Some(r) = recorded {
                    anthropic.add(info.input_estimate, r, ex["name"].as_str().unwrap_or(""));
                }
            }
        }
    }
    openai.print("OpenAI fixtures against o200k (cookbook framing)");
    openai_recorded.print("OpenAI fixtures against their recorded usage (synthesised)");
    anthropic.print("Anthropic fixtures against their recorded usage (synthesised)");
}
