"""`make cost`: what the stack in template.yaml costs a month at list prices.

- `prices`   the price table (one place, with the date it was checked and the sources);
- `cfn`      reads template.yaml and evaluates the intrinsic functions it uses;
- `measure`  runs every family once against the simulated deployment and records the EMF
             records, the DynamoDB items and the requests a real run makes;
- `model`    turns the template, the measurements and the assumptions into line items.

scripts/cost.py is the command; docs/cost.md explains the model.
"""
