{{/* RBAC rule lists, included by rbac.yaml. */}}
{{- define "stepfleet.rbac.namespacedRules" -}}
# The DiffusionService itself: kopf lists and watches it to reconcile; patch adds and removes
# the operator's finalizer and kopf's progress annotations. No create/update/delete: users own it.
- apiGroups: ["stepfleet.io"]
  resources: ["diffusionservices"]
  verbs: ["get", "list", "watch", "patch"]
# observedGeneration, mode, per-pool replicas/weights, conditions.
- apiGroups: ["stepfleet.io"]
  resources: ["diffusionservices/status"]
  verbs: ["patch"]
# Children (docs/operator.md, "Children"): router and pool Deployments, their Services, the
# router's weights ConfigMap, and the pools' PodDisruptionBudgets. get/list/watch: find them
# again by label and refresh status when Deployments change; create/patch: the three-way-merge
# apply; delete: prune pools removed from the spec. No update (apply patches), no deletecollection.
# The control loop patches pool Deployments' replicas.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Router and pool Services; the router ConfigMap (the control loop patches its weights).
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# One PodDisruptionBudget per pool (maxUnavailable: 1).
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# One ServiceMonitor per DiffusionService, only where the Prometheus Operator's API is served.
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The router's own identity, one of each per DiffusionService: a ServiceAccount and a Role with a
# RoleBinding that let the router list and watch its pools' EndpointSlices (it dials worker pods
# directly instead of the Service's ClusterIP).
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The router's Role (read EndpointSlices) and its RoleBinding to that ServiceAccount.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Kubernetes lets a subject grant only permissions it holds itself (RBAC escalation check), so the
# operator holds the router Role's: read EndpointSlices.
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
# One NetworkPolicy per DiffusionService: only its router, this operator and the scraper reach its
# workers (spec.security.networkPolicy); delete when that is turned off.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# kopf's and the operator's own Events (InvalidSpec, ChildConflict, mode switches).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.controlLoop.rbac }}
# Control loop (observe, operator/loop/sources.py): the pools' worker pods, listed each interval
# (Pending/Unschedulable past a grace period means capacity is short; their IPs are scraped).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- end }}
{{- end }}
{{- define "stepfleet.rbac.clusterWideRules" -}}
# Only for a cluster-wide operator (operator.clusterWide): kopf watches namespaces to pick up new
# ones, and CRDs to notice the DiffusionService CRD coming and going. Given exact namespaces, the
# operator turns kopf's scanning off (OperatorConfig.scan_cluster) and needs neither.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
# kopf checks that the CRD of each watched resource exists before it watches.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}
{{- define "stepfleet.rbac.clusterRules" -}}
{{- if .Values.karpenter.rbac }}
# Karpenter NodePools for pools with `nodePool` (cluster-scoped): create/patch/delete to keep
# them in step with the spec (the control loop also patches their limits); get/list to find
# leftovers; delete from the finalizer, since owner references cannot reach cluster-scoped objects.
- apiGroups: ["karpenter.sh"]
  resources: ["nodepools"]
  verbs: ["get", "list", "create", "patch", "delete"]
{{- if .Values.controlLoop.rbac }}
# Control loop (observe): Karpenter's InsufficientCapacityError Events on NodeClaims. Events
# about cluster-scoped NodeClaims are not in the fleet's namespace, so the loop lists them
# cluster-wide, filtered by reason and involvedObject.kind.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["list"]
# ... and the NodeClaims those Events name, to map them to a pool's NodePool. Read only.
- apiGroups: ["karpenter.sh"]
  resources: ["nodeclaims"]
  verbs: ["list"]
{{- end }}
{{- end }}
{{- end }}
