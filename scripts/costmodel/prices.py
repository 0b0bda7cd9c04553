"""List prices, us-east-1, in one place: what the cost model multiplies by.

Checked on CHECKED against the AWS pricing pages named in each entry (and, where those pages
render their figures with scripts, against public write-ups quoting them). Free tiers are not
applied: the model answers "what does this cost at list prices", and an account's free tier
is usually spent elsewhere. docs/cost.md lists the same table; change both together.
"""

from __future__ import annotations

from dataclasses import dataclass

CHECKED = "2026-12-02"
REGION = "us-east-1"

# Bytes in a billing GB (AWS bills storage and ingestion in binary gigabytes).
GB = 1024**3


@dataclass(frozen=True)
class Price:
    amount: float  # US dollars per `unit`
    unit: str
    source: str
    note: str = ""

    def label(self) -> str:
        """The price as the table prints it, per a million units when it is tiny."""
        if 0 < self.amount < 0.01:
            return f"{_money(self.amount * 1e6)} / 1M {self.unit}"
        return f"{_money(self.amount)} / {self.unit}"


def _money(value: float) -> str:
    return f"${value:.2f}" if round(value, 2) == round(value, 6) else f"${value:.4g}"


LAMBDA = "https://aws.amazon.com/lambda/pricing/"
DYNAMODB = "https://aws.amazon.com/dynamodb/pricing/on-demand/"
CLOUDWATCH = "https://aws.amazon.com/cloudwatch/pricing/"
APIGW = "https://aws.amazon.com/api-gateway/pricing/"
ROUTE53 = "https://aws.amazon.com/route53/pricing/"
SNS = "https://aws.amazon.com/sns/pricing/"
EVENTBRIDGE = "https://aws.amazon.com/eventbridge/pricing/"

PRICES: dict[str, Price] = {
    # Lambda, arm64 (first tier: the first 7.5 billion GB-s a month).
    "lambda_request": Price(0.20 / 1e6, "request", LAMBDA),
    "lambda_gb_second_arm64": Price(
        0.0000133334, "GB-s", LAMBDA,
        "arm64; since 2025-08-01 the INIT phase of a cold start is billed as duration too",
    ),
    # DynamoDB on-demand, Standard table class (after the 2024-11-01 cut of 50 %).
    "dynamodb_write_unit": Price(
        0.625 / 1e6, "WRU", DYNAMODB, "1 WRU per started 1 KB of item"
    ),
    "dynamodb_read_unit": Price(
        0.125 / 1e6, "RRU", DYNAMODB,
        "1 RRU per started 4 KB read strongly consistently",
    ),
    "dynamodb_storage": Price(0.25, "GB-month", DYNAMODB, "item bytes + 100 B each"),
    "dynamodb_pitr": Price(0.20, "GB-month", DYNAMODB, "continuous backups, on table size"),
    # CloudWatch.
    "cw_custom_metric": Price(
        0.30, "metric-month", CLOUDWATCH, "first 10,000; prorated by the hour"
    ),
    "cw_alarm_standard": Price(0.10, "alarm metric-month", CLOUDWATCH, "standard resolution"),
    "cw_alarm_composite": Price(0.50, "alarm-month", CLOUDWATCH),
    "cw_dashboard": Price(3.00, "dashboard-month", CLOUDWATCH, "3 free in the free tier"),
    "cw_logs_ingestion": Price(
        0.50, "GB", CLOUDWATCH, "Standard class; Lambda logs' first tier (up to 10 TB)"
    ),
    "cw_logs_storage": Price(0.03, "GB-month", CLOUDWATCH),
    # API Gateway HTTP API (first 300 million requests a month).
    "apigw_http_request": Price(1.00 / 1e6, "request", APIGW),
    # Route 53 health checks. An "AWS endpoint" is an AWS resource in (or linked to) the same
    # account, such as an EC2 instance or a load balancer; API Gateway's execute-api host is
    # AWS's, not the account's, so the model takes it as a non-AWS endpoint by default.
    "r53_check_aws": Price(0.50, "health check-month", ROUTE53, "AWS endpoint"),
    "r53_check_other": Price(0.75, "health check-month", ROUTE53, "non-AWS endpoint"),
    "r53_feature_aws": Price(
        1.00, "feature-month", ROUTE53,
        "each of HTTPS, string matching, fast interval (10 s), latency measurement",
    ),
    "r53_feature_other": Price(2.00, "feature-month", ROUTE53, "the same, non-AWS endpoint"),
    # SNS e-mail notifications beyond the first 1,000 a month; the topic itself is free.
    "sns_email": Price(2.00 / 100_000, "e-mail", SNS),
    # EventBridge scheduled rules on the default bus deliver to Lambda at no charge.
    "eventbridge_schedule": Price(0.0, "rule-month", EVENTBRIDGE),
}
