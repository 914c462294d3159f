"""Score = the share of the query's distinct words that the document contains (0 to 1)."""

from dify_plugin import RerankModel
from dify_plugin.entities.model.rerank import RerankDocument, RerankResult
from provider.parrot import ERROR_MAPPING, check_credentials


def score(query: str, doc: str) -> float:
    wanted = {word.lower() for word in query.split()}
    if not wanted:
        return 0.0
    have = {word.lower().strip(".,;:!?") for word in doc.split()}
    return len(wanted & have) / len(wanted)


class ParrotRerankModel(RerankModel):
    def _invoke(
        self,
        model: str,
        credentials: dict,
        query: str,
        docs: list[str],
        score_threshold: float | None = None,
        top_n: int | None = None,
        user: str | None = None,
    ) -> RerankResult:
        ranked = [
            RerankDocument(index=index, text=doc, score=score(query, doc))
            for index, doc in enumerate(docs)
        ]
        ranked.sort(key=lambda d: (-d.score, d.index))
        if score_threshold is not None:
            ranked = [d for d in ranked if d.score >= score_threshold]
        if top_n is not None:
            ranked = ranked[:top_n]
        return RerankResult(model=model, docs=ranked)

    def validate_credentials(self, model: str, credentials: dict) -> None:
        check_credentials(credentials)

    @property
    def _invoke_error_mapping(self) -> dict:
        return ERROR_MAPPING
