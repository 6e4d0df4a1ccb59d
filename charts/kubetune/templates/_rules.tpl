{{/*
kubetune's alerting rules, as the `groups:` of a Prometheus rule file (the PrometheusRule's spec).
tests/chart/test_prometheus.py checks them with `promtool check rules` and runs each expr against a real
Prometheus. Trainer series carry job (FineTuneJob name) and namespace labels (see podmonitor.yaml).
*/}}
{{- define "kubetune.ruleGroups" -}}
{{- $r := .Values.prometheusRule }}
{{- $checkpointSeconds := mul (int $r.checkpointAgeMinutes) 60 }}
groups:
  - name: kubetune
    rules:
      - alert: KubetuneJobFailed
        # max, not sum: every replica (leader or not) reports the jobs it knows.
        expr: max(kubetune_jobs{phase="Failed"}) > 0
        for: 1m
        labels:
          severity: {{ $r.severity }}
          {{- with $r.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: FineTuneJobs have failed.
          description: >-
            {{ "{{ $value }}" }} FineTuneJob(s) known to the operator are in phase Failed (they ran out of
            failure budget or have an invalid spec). `kubectl get finetunejobs -A` and
            `kubectl describe finetunejob NAME` show the reason.
      - alert: KubetuneRepeatedPreemptions
        expr: sum by (namespace, reason) (increase(kubetune_preemptions_total[{{ $r.preemptionsWindow }}])) > {{ $r.preemptionsThreshold }}
        labels:
          severity: {{ $r.severity }}
          {{- with $r.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: Trainer pods are preempted repeatedly.
          description: >-
            {{ "{{ $value | humanize }}" }} trainer attempts ended by {{ "{{ $labels.reason }}" }} in the
            last {{ $r.preemptionsWindow }}. Jobs keep resuming from checkpoints, but lost steps add up:
            consider on-demand capacity or a higher priorityClassName.
      - alert: KubetuneJobNoProgress
        expr: >-
          (changes(kubetune_trainer_step[{{ $r.noProgressMinutes }}m]) == 0)
          and (kubetune_trainer_step < kubetune_trainer_total_steps)
        for: 2m
        labels:
          severity: {{ $r.severity }}
          {{- with $r.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: A fine-tuning job makes no progress.
          description: >-
            FineTuneJob {{ "{{ $labels.namespace }}/{{ $labels.job }}" }} has been at step
            {{ "{{ $value }}" }} for {{ $r.noProgressMinutes }} minutes. Check the trainer pod's logs
            (data loading, a hung collective, a GPU fault).
      - alert: KubetuneCheckpointTooOld
        # Seconds of training since the newest durable checkpoint, estimated as steps since it divided by
        # the recent step rate: the work a preemption right now would throw away. A stalled job (rate 0)
        # is KubetuneJobNoProgress's business, so it is filtered out here.
        expr: >-
          (kubetune_trainer_step - kubetune_trainer_checkpoint_step)
          / (deriv(kubetune_trainer_step[10m]) > 0) > {{ $checkpointSeconds }}
        for: 5m
        labels:
          severity: {{ $r.severity }}
          {{- with $r.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: A fine-tuning job's newest checkpoint is old.
          description: >-
            FineTuneJob {{ "{{ $labels.namespace }}/{{ $labels.job }}" }} has trained about
            {{ "{{ $value | humanizeDuration }}" }} since its newest checkpoint (more than
            {{ $r.checkpointAgeMinutes }} minutes): a preemption now would lose that work. Lower
            spec.checkpoint.everySteps or check checkpoint write errors.
{{- end }}
